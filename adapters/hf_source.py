"""hf:// model source: a Hub repository snapshot, fetched by huggingface_hub into its own cache.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and the cache location once, when first imported; they are read
here on every call instead, so that the environment the server starts with is the one that counts.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub import errors as hf_errors

from kvserve.adapters.model_source import LogProgress, ModelSourceError, check_listing, read_json, serving_patterns

WORKERS = 8


def fetch_hf(ref: str, cache_dir: Path | None, allow_pickle: bool, patterns: list[str] | None = None) -> Path:
    """A model's serving files, or only the files matching `patterns` (a LoRA adapter's)."""
    repo_id, _, revision = ref.partition("@")
    env = os.environ.get
    endpoint = (env("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    offline = (env("HF_HUB_OFFLINE") or env("TRANSFORMERS_OFFLINE") or "").strip().lower() in ("1", "true", "yes")
    home = env("HF_HOME")
    cache = str(cache_dir or env("HF_HUB_CACHE") or (Path(home) / "hub" if home else constants.HF_HUB_CACHE))
    token = env("HF_TOKEN") or None
    where = f"{repo_id}@{revision}" if revision else repo_id

    def snapshot(pickles: bool) -> Path:
        allow, ignore = (patterns, []) if patterns else serving_patterns(pickles)
        return Path(snapshot_download(
            repo_id, revision=revision or None, cache_dir=cache, endpoint=endpoint, token=token,
            local_files_only=offline, allow_patterns=allow, ignore_patterns=ignore, max_workers=WORKERS,
            tqdm_class=None if sys.stderr.isatty() else LogProgress))

    try:
        path = snapshot(pickles=False)
        if patterns:
            return path
        if not any(path.glob("*.safetensors")):
            # Pickles only when the repo has no safetensors weights: many carry both.
            if allow_pickle:
                return snapshot(pickles=True)
            if not offline:
                # Tell apart a repo without weights from one whose pickles were, rightly, not fetched.
                names = HfApi(endpoint=endpoint, token=token).list_repo_files(repo_id, revision=path.name)
                check_listing({n for n in names if "/" not in n}, read_json(path / "config.json"), False,
                              f"Hub repository {where}")
        return path
    except ModelSourceError:
        raise
    except hf_errors.GatedRepoError as e:
        raise ModelSourceError(f"Hub repository {repo_id} is gated: accept its terms on the Hub and set HF_TOKEN "
                               "to a token of an account with access") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise ModelSourceError(f"Hub repository {repo_id} not found at {endpoint} (if it is private, set HF_TOKEN)") \
            from e
    except hf_errors.RevisionNotFoundError as e:
        raise ModelSourceError(f"revision {revision!r} not found in Hub repository {repo_id} at {endpoint}") from e
    except hf_errors.LocalEntryNotFoundError as e:
        if offline:
            raise ModelSourceError(f"HF_HUB_OFFLINE is set and {where} is not (completely) in the Hugging Face "
                                   f"cache {cache}") from e
        raise ModelSourceError(f"cannot reach the Hub at {endpoint} and {where} is not (completely) in the Hugging "
                               f"Face cache {cache}") from e
    except hf_errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise ModelSourceError(f"the Hub at {endpoint} answered {status} for {where}: {_first_line(e)}") from e
    except hf_errors.HFValidationError as e:
        raise ModelSourceError(f"{ref!r} is not a Hub repository id (org/name[@revision]): {_first_line(e)}") from e
    except Exception as e:  # connection drops mid-file, disk full: still one line for the operator
        raise ModelSourceError(f"fetching {where} from {endpoint} failed: {type(e).__name__}: {_first_line(e)}") \
            from e


def _first_line(e: Exception) -> str:
    return next((line for line in str(e).splitlines() if line.strip()), "")
