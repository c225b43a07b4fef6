"""Model sources: a local folder, a model repository, s3:// or hf:// -> a verified local Hugging Face folder.

The s3:// and hf:// fetchers live in s3_source.py and hf_source.py; this file holds what they share: the rule for
which files serving needs, the checks that a folder is servable, the error type and the progress display.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

from tqdm.std import tqdm

log = logging.getLogger(__name__)

# What serving reads from a model folder. Anything else in a bucket or repo (optimizer states, ONNX or GGUF
# exports, images) is never fetched.
SERVING_FILES = [
    "config.json", "generation_config.json", "kvserve.json",
    "*.safetensors", "*.safetensors.index.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "*.tiktoken", "chat_template*",
    "adapters/*",
]
# Pickle checkpoints run arbitrary code when unpickled: fetched and accepted only on the user's opt-in.
PICKLE_FILES = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.bin.index.json"]
# Mistral's and Meta's native-format copies of the same weights, shipped beside the HF ones in many repos.
NEVER_FILES = ["consolidated*", "original/*"]

_TOKENIZERS = [{"tokenizer.json"}, {"tokenizer.model"}, {"vocab.json", "merges.txt"}]
_FALLBACK_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
LOG_PERIOD_S = 10.0


class ModelSourceError(Exception):
    """A model that cannot be found, fetched or served; str() is one line naming the cause."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def resolve_model_dir(model_dir: str, model_name: str | None = None, *, cache_dir: str | None = None,
                      allow_pickle: bool = False) -> Path:
    """A local folder, a model repository (one subfolder per model), s3://bucket/prefix, hf://org/name[@rev]
    or a bare org/name -> the local folder of one checked, servable model."""
    source = str(model_dir).strip().removeprefix("file://")
    if source.startswith("s3://"):
        from kvserve.adapters.s3_source import fetch_s3
        path = fetch_s3(source, model_name, cache_root(cache_dir) / "s3", allow_pickle)
    elif source.startswith("hf://") or (_HUB_ID.fullmatch(source) and not Path(source).exists()):
        from kvserve.adapters.hf_source import fetch_hf
        path = fetch_hf(source.removeprefix("hf://"), Path(cache_dir) / "hf" if cache_dir else None, allow_pickle)
    elif "://" in source:
        raise ModelSourceError(f"unsupported model source {source!r}: use a local folder, s3://bucket/prefix "
                               "or hf://org/name[@revision]")
    else:
        path = _local_model(Path(source).expanduser(), model_name)
    check_model_dir(path, allow_pickle)
    log.info("model folder: %s", path)
    return path


ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def resolve_adapter_dir(source: str, cache_dir: str | None = None) -> Path:
    """A LoRA adapter's local folder, s3://bucket/prefix or hf://org/name[@rev] -> its local folder. Fetched
    adapters land under the kvserve cache, one of the engine's allowed adapter roots."""
    source = str(source).strip().removeprefix("file://")
    if source.startswith("s3://"):
        from kvserve.adapters.s3_source import fetch_s3_files
        path = fetch_s3_files(source, cache_root(cache_dir) / "s3", ADAPTER_FILES)
    elif source.startswith("hf://"):
        from kvserve.adapters.hf_source import fetch_hf
        path = fetch_hf(source.removeprefix("hf://"), cache_root(cache_dir) / "hf", False, ADAPTER_FILES)
    elif "://" in source:
        raise ModelSourceError(f"unsupported adapter source {source!r}: use a local folder, s3://bucket/prefix "
                               "or hf://org/name[@revision]")
    else:
        path = Path(source).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ModelSourceError(f"{source}: no adapter_config.json there (not a PEFT LoRA adapter)")
    return path


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("KVSERVE_CACHE_DIR") or "~/.cache/kvserve").expanduser()


def _local_model(root: Path, model_name: str | None) -> Path:
    if not root.is_dir():
        raise ModelSourceError(f"model folder {root} does not exist" if not root.exists()
                               else f"model path {root} is not a folder")
    if (root / "config.json").is_file():
        return root
    return root / pick_model(sorted(p.parent.name for p in root.glob("*/config.json")), model_name, str(root))


def pick_model(models: list[str], model_name: str | None, where: str) -> str:
    """One model of a repository that holds one subfolder per model."""
    if model_name in models:
        return model_name
    if not models:
        raise ModelSourceError(f"no config.json in {where}: neither a Hugging Face model folder "
                               "nor a repository of them")
    if len(models) == 1:
        # KServe always passes the InferenceService name as --model_name; with one model there is no doubt.
        if model_name:
            log.info("serving %s/%s as %r: the repository holds no model named %r",
                     where.rstrip("/"), models[0], model_name, model_name)
        return models[0]
    held = ", ".join(models)
    if model_name is None:
        raise ModelSourceError(f"{where} is a model repository holding {held}: choose one with --model_name")
    raise ModelSourceError(f"model {model_name!r} not found in repository {where} (it holds {held})")


def serving_patterns(pickles: bool) -> tuple[list[str], list[str]]:
    """(allow, ignore) fnmatch patterns of the files to fetch, as huggingface_hub takes them."""
    if pickles:
        return SERVING_FILES + PICKLE_FILES, NEVER_FILES
    return SERVING_FILES, NEVER_FILES + PICKLE_FILES


def serving_files(paths: list[str], allow_pickle: bool) -> list[str]:
    """The files of a listing (paths relative to the model folder) that serving needs. Pickles only when allowed
    and no safetensors weights exist: many repos carry both, and fetching both doubles the download."""
    pickles = allow_pickle and not _weights({p for p in paths if "/" not in p})
    allow, ignore = serving_patterns(pickles)
    return [p for p in paths if any(fnmatch(p, a) for a in allow) and not any(fnmatch(p, i) for i in ignore)]


def _weights(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.endswith(".safetensors") and not fnmatch(n, "consolidated*"))


def check_listing(names: set[str], config: dict, allow_pickle: bool, where: str) -> None:
    """Checks what a model folder holds (its top-level file names and parsed config.json), before anything heavy
    is read or fetched."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise ModelSourceError(f"config.json in {where} names no architectures")
    supported = supported_architectures()
    if archs[0] not in supported:
        raise ModelSourceError(f"unsupported architecture {archs[0]} in {where}: kvserve serves "
                               f"{', '.join(sorted(supported))}")
    if not _weights(names):
        pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth")))
        if not pickles:
            raise ModelSourceError(f"no weights in {where}: expected *.safetensors files")
        if not allow_pickle:
            raise ModelSourceError(f"{where} holds only pickle weights ({', '.join(pickles[:3])}), which can run "
                                   "code when loaded: convert them to safetensors, or pass --allow-pickle "
                                   "if you trust their source")
    if not any(s <= names for s in _TOKENIZERS) and not any(n.endswith(".tiktoken") for n in names):
        raise ModelSourceError(f"no tokenizer in {where}: expected tokenizer.json, tokenizer.model, "
                               "or vocab.json with merges.txt")


def check_model_dir(path: str | Path, allow_pickle: bool = False) -> Path:
    """Verifies a local folder is servable: config, supported architecture, complete weights, tokenizer."""
    path = Path(path)
    if not path.is_dir():
        raise ModelSourceError(f"model folder {path} does not exist")
    names = {p.name for p in path.iterdir() if p.is_file()}
    if "config.json" not in names:
        raise ModelSourceError(f"no config.json in {path}: not a Hugging Face model folder")
    config = read_json(path / "config.json")
    check_listing(names, config, allow_pickle, str(path))
    for index in sorted(path.glob("*.safetensors.index.json")):
        shards = set(read_json(index).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelSourceError(f"{index.name} in {path} lists missing shard(s): {', '.join(missing[:3])}")
    for name in _weights(names):
        _check_safetensors(path / name)
    read_settings(path)
    return path


def _check_safetensors(file: Path) -> None:
    # A truncated copy has an intact header that promises more bytes than the file holds.
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelSourceError(f"weights file {file} is not valid safetensors: {e}") from e
    if 8 + n + end != size:
        raise ModelSourceError(f"weights file {file} is truncated or corrupt: its header describes "
                               f"{8 + n + end} bytes, the file has {size}")


def read_json(file: Path) -> dict:
    try:
        data = json.loads(Path(file).read_text())
    except FileNotFoundError as e:
        raise ModelSourceError(f"no {Path(file).name} in {Path(file).parent}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelSourceError(f"{file} must hold a JSON object")
    return data


def read_settings(path: str | Path) -> dict:
    """The model folder's optional kvserve.json: engine defaults under vLLM's argument names."""
    file = Path(path) / "kvserve.json"
    return read_json(file) if file.is_file() else {}


def supported_architectures() -> set[str]:
    try:
        from kvserve.runtime.models import SUPPORTED_ARCHITECTURES
    except ImportError as e:
        # Only a registry not written yet falls back; a registry that fails to import for another reason is a bug.
        if not (e.name or "").startswith("kvserve.runtime.models"):
            raise
        log.warning("kvserve.runtime.models has no SUPPORTED_ARCHITECTURES (%s); using the built-in list", e)
        return set(_FALLBACK_ARCHITECTURES)
    return set(SUPPORTED_ARCHITECTURES)


def progress_class() -> type[tqdm]:
    """A redrawn bar on a terminal; in a pod's log, a line every LOG_PERIOD_S seconds."""
    return tqdm if sys.stderr.isatty() else LogProgress


class LogProgress(tqdm):
    def __init__(self, *args, **kwargs):
        kwargs.pop("name", None)
        kwargs.update(disable=False, file=io.StringIO())
        self._logged_at = 0.0
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if time.monotonic() - self._logged_at >= LOG_PERIOD_S:
            self._log()
        return True

    def close(self):
        if not self.disable and self._logged_at != float("inf"):
            self._log()
            self._logged_at = float("inf")
        super().close()

    def _log(self):
        self._logged_at = time.monotonic()
        d = self.format_dict
        size = (lambda x: self.format_sizeof(x, "B", 1024)) if d["unit"] == "B" else (lambda x: f"{x:.0f}")
        done = f"{size(d['n'])}/{size(d['total'])} ({100 * d['n'] / d['total']:.0f}%)" if d["total"] else size(d["n"])
        rate = d["rate"] or (d["n"] / d["elapsed"] if d["elapsed"] else 0)
        log.info("%s: %s, %s/s", d["prefix"] or "download", done, size(rate))
