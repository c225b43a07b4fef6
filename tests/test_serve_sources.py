"""`kvserve serve` with its model in S3 (moto's real HTTP server, behind the relay of tests/fakes.py) or on a fake
Hub: it loads the embedded model from there and answers what the local folder answers; a store that dies
mid-download leaves nothing loadable and the next start completes; every load failure ends the command with one
`error:` line naming the cause."""
import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from fakes import SHA, S3_ENV_CLEARED, FakeHub, Relay, admin_client, iam_key, moto_auth, repo_files, s3_env, upload
from kvserve.runtime.sampling_params import SamplingParams
from server import MODEL_DIR, MODEL_NAME, REPO, engine_flags, free_port, start_server

BUCKET = "models-e2e"
PROMPT = "The lighthouse keeper"
SERVED = sorted(p.name for p in MODEL_DIR.iterdir() if p.is_file())  # every file of the folder serves


@pytest.fixture(scope="module")
def store(moto_port, tmp_path_factory):
    """models/tiny: the embedded model; models/tiny-lora/: a sibling prefix no start may fetch; models/noconfig and
    models/gpt2: the same model without its config.json, and declaring an architecture kvserve does not serve."""
    admin = admin_client(moto_port)
    admin.create_bucket(Bucket=BUCKET)
    upload(admin, BUCKET, MODEL_DIR, "models/tiny")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        admin.put_object(Bucket=BUCKET, Key=f"models/tiny-lora/{name}", Body=b"{}")
    work = tmp_path_factory.mktemp("store")
    noconfig = shutil.copytree(MODEL_DIR, work / "noconfig")
    (noconfig / "config.json").unlink()
    upload(admin, BUCKET, noconfig, "models/noconfig")
    gpt2 = shutil.copytree(MODEL_DIR, work / "gpt2")
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    upload(admin, BUCKET, gpt2, "models/gpt2")
    return BUCKET


@pytest.fixture
def relay(moto_port, store, monkeypatch, tmp_path):
    """The S3 endpoint `kvserve serve` sees, and the environment it inherits: credentials, a fresh model cache."""
    for name in S3_ENV_CLEARED + ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    relay = Relay(moto_port)
    for name, value in s3_env(relay.url, tmp_path / "none").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    yield relay
    relay.kill()


@pytest.fixture(scope="module")
def want(llm) -> str:
    """What the local folder answers."""
    return llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text


def complete(server) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    res = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    return res.choices[0].text


def serve(model_dir: str, *flags: str) -> subprocess.CompletedProcess:
    """`kvserve serve` expected to fail before it listens."""
    return subprocess.run([sys.executable, "-m", "kvserve", "serve", "--http_port", str(free_port()),
                           "--grpc_port", str(free_port()), "--model_dir", model_dir, *engine_flags(), *flags],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def one_error_line(run: subprocess.CompletedProcess, *words: str) -> str:
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr
    assert all(w in errors[0] for w in words), (words, errors[0])
    return errors[0]


def cached_models(cache: Path) -> list[str]:
    """What the S3 cache holds under the bucket's models/ folder."""
    return sorted(p.name for p in (cache / "s3" / BUCKET / "models").iterdir())


def test_s3_and_hub_models_answer_like_the_local_folder(relay, want, tmp_path, monkeypatch):
    hub = FakeHub({"org/tiny": {**repo_files(MODEL_DIR), "README.md": b"# tiny"}})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with ThreadPoolExecutor(2) as pool:  # two cold starts side by side
        starts = [pool.submit(start_server, ["--model_dir", uri, *engine_flags()])
                  for uri in (f"s3://{BUCKET}/models/tiny/", f"hf://org/tiny@{SHA}")]
        servers = [s.result() for s in starts]
    try:
        assert [complete(s) for s in servers] == [want, want]
        # Fetched files sit in the caches: the store's sibling prefix and the Hub's README stayed out.
        cache = tmp_path / "cache"
        assert cached_models(cache) == ["tiny", "tiny.kvserve-lock"]
        assert sorted(p.name for p in (cache / "s3" / BUCKET / "models" / "tiny").iterdir()) == sorted(
            SERVED + [".kvserve-complete.json"])
        assert not [k for k in relay.object_gets(BUCKET) if "tiny-lora" in k]
        snapshot = tmp_path / "hf" / "models--org--tiny" / "snapshots" / SHA
        assert sorted(p.name for p in snapshot.iterdir()) == SERVED
        # A pod's log shows the download's progress (the last line at 100%).
        assert re.search(rf"fetching s3://{BUCKET}/models/tiny/: .*\(100%\)", servers[0].log_tail(100_000))
    finally:
        for s in servers:
            s.stop()
        hub.close()


def test_store_dying_mid_download_leaves_nothing_loadable_and_the_next_start_completes(relay, want, tmp_path,
                                                                                       moto_port):
    cache = tmp_path / "cache"
    entry = cache / "s3" / BUCKET / "models" / "tiny"
    partial = entry.with_name("tiny.kvserve-partial")
    weights = (MODEL_DIR / "model.safetensors").stat().st_size
    relay.kill_after = 2 << 20  # the store goes away 2 MiB into the 5 MiB of weights
    line = one_error_line(serve(f"s3://{BUCKET}/models/tiny"), "cannot reach the S3 endpoint", relay.url)
    assert cached_models(cache) == ["tiny.kvserve-lock", "tiny.kvserve-partial"], line
    assert 0 < (partial / "model.safetensors.part").stat().st_size < weights
    # Neither a start pointed at the partial folder nor a restart while the store is still down serves it.
    one_error_line(serve(str(partial)), "no weights in", str(partial))
    one_error_line(serve(f"s3://{BUCKET}/models/tiny"), "cannot reach the S3 endpoint")
    assert not entry.exists()

    back = Relay(moto_port, port=relay.port)  # the store is back, same address
    try:
        server = start_server(["--model_dir", f"s3://{BUCKET}/models/tiny", *engine_flags()])
        try:
            assert complete(server) == want
        finally:
            server.stop()
        # It resumed the cut file from where it stopped rather than fetching it again.
        [(_, _, headers)] = [r for r in back.requests() if r[1].endswith("/models/tiny/model.safetensors")]
        assert "range: bytes=" in headers and "if-match" in headers
        assert cached_models(cache) == ["tiny", "tiny.kvserve-lock"]  # no partial left, no sibling prefix
        assert not [k for k in relay.object_gets(BUCKET) + back.object_gets(BUCKET) if "tiny-lora" in k]
        assert (entry / "model.safetensors").read_bytes() == (MODEL_DIR / "model.safetensors").read_bytes()
    finally:
        back.kill()


def test_load_failures_end_with_one_error_line(relay, moto_port, monkeypatch):
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(serve, ["s3://no-such-bucket/models/tiny", f"s3://{BUCKET}/models/noconfig",
                                     f"s3://{BUCKET}/models/gpt2"]))
    one_error_line(runs[0], "bucket 'no-such-bucket' does not exist", relay.url, "NoSuchBucket")
    one_error_line(runs[1], f"no config.json in s3://{BUCKET}/models/noconfig/")
    one_error_line(runs[2], "unsupported architecture GPT2LMHeadModel", "Qwen3ForCausalLM")

    key = iam_key(moto_port)
    moto_auth(moto_port, "0")  # from now on moto checks every request against its IAM users
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        one_error_line(serve(f"s3://{BUCKET}/models/tiny"), "rejected the access key (InvalidAccessKeyId)",
                       "AWS_ACCESS_KEY_ID")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        one_error_line(serve(f"s3://{BUCKET}/models/tiny"), "SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY")
    finally:
        moto_auth(moto_port, "inf")


def test_engine_settings_it_cannot_honour_are_one_error_line():
    one_error_line(serve(str(MODEL_DIR), "--kv-offload-cpu-gb", "1", "--no-enable-prefix-caching"),
                   "KV offload", "enable_prefix_caching")
