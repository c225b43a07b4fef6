"""Model sources against real servers on loopback (tests/fakes.py): moto's S3 HTTP server (behind a relay that can
drop the connection mid-transfer, count requests or flip bytes) and a small HTTP server answering the Hub endpoints
huggingface_hub calls."""
import json
import logging
import re
import socket
from pathlib import Path

import boto3
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models

from fakes import SHA, S3_ENV_CLEARED, FakeHub, Relay, admin_client, iam_key, moto_auth, repo_files, s3_env, upload
from kvserve.adapters.model_source import (ModelSourceError, check_model_dir, read_settings, resolve_model_dir,
                                           supported_architectures)

SERVING = {"config.json", "generation_config.json", "kvserve.json", "model.safetensors.index.json",
           "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json",
           "tokenizer_config.json", "adapters/sql/adapter_config.json", "adapters/sql/adapter_model.safetensors"}
BIG = 6 << 20  # the second shard: big enough to be cut mid-transfer, and uploaded in two parts


def make_model(folder: Path, arch: str = "LlamaForCausalLM", big: int = 4096, seed: int = 0) -> Path:
    """A Hugging Face folder: two safetensors shards with an index, a real tokenizer, config files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (folder / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "llama",
                                                    "hidden_size": 8, "vocab_size": 16}))
    save_file({"embed": rng.standard_normal((16, 8), dtype=np.float32)}, folder / "model-00001-of-00002.safetensors")
    save_file({"head": rng.standard_normal(big // 4, dtype=np.float32)}, folder / "model-00002-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "embed": "model-00001-of-00002.safetensors", "head": "model-00002-of-00002.safetensors"}}))
    Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<unk>"}')
    (folder / "generation_config.json").write_text('{"temperature": 0.5, "note": "MAGIC-MARKER"}')
    (folder / "kvserve.json").write_text('{"max_model_len": 64}')
    (folder / "adapters" / "sql").mkdir(parents=True)
    (folder / "adapters" / "sql" / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
    save_file({"a": np.ones((2, 8), dtype=np.float32)}, folder / "adapters" / "sql" / "adapter_model.safetensors")
    return folder


# ---------------------------------------------------------------------------------------------------------------- S3


@pytest.fixture
def s3(moto_port, monkeypatch, tmp_path):
    """A relay to moto as the loader's endpoint, a client straight to moto for setting buckets up."""
    for name in S3_ENV_CLEARED:
        monkeypatch.delenv(name, raising=False)
    relay = Relay(moto_port)
    for name, value in s3_env(relay.url, tmp_path / "none").items():
        monkeypatch.setenv(name, value)
    yield relay, admin_client(moto_port)
    relay.kill()


@pytest.fixture
def bucket(s3, tmp_path, request):
    """models/tiny (a model), models/tiny-lora/ (a sibling prefix that must never be fetched), and extras no
    server needs beside the model (README, an ONNX export, a pickle copy)."""
    relay, admin = s3
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    admin.create_bucket(Bucket=name)
    src = make_model(tmp_path / "src", big=BIG)
    upload(admin, name, src, "models/tiny")
    for key in ("models/tiny/README.md", "models/tiny/onnx/model.onnx", "models/tiny/pytorch_model.bin",
                "models/tiny/adapters/sql/adapter_model.bin", "models/tiny/consolidated.safetensors",
                "models/tiny-lora/adapter_config.json", "models/tiny-lora/adapter_model.safetensors"):
        admin.put_object(Bucket=name, Key=key, Body=b"x" * 64)
    return name, src


def same_files(got: Path, src: Path, names=SERVING):
    assert {p.relative_to(got).as_posix() for p in got.rglob("*")
            if p.is_file() and not p.name.startswith(".")} == names
    for n in names:
        assert (got / n).read_bytes() == (src / n).read_bytes(), n


def test_s3_trailing_slash_or_not_fetches_only_the_model_then_caches(s3, bucket, tmp_path, caplog):
    relay, _ = s3
    name, src = bucket
    caplog.set_level(logging.INFO, logger="kvserve")
    got = resolve_model_dir(f"s3://{name}/models/tiny/", cache_dir=str(tmp_path / "cache"))
    assert got == tmp_path / "cache" / "s3" / name / "models" / "tiny"
    same_files(got, src)
    fetched = relay.object_gets(name)
    assert sorted(fetched) == sorted(f"models/tiny/{n}" for n in SERVING)  # no README/onnx/.bin, no tiny-lora
    assert not list((tmp_path / "cache" / "s3" / name / "models").glob("*partial*"))
    # Pods log lines, not redrawn bars: the final progress line covers every byte.
    assert any(re.search(rf"fetching s3://{name}/models/tiny/: .*\(100%\)", r.getMessage()) for r in caplog.records)

    # Without the slash: the same folder, not models/tiny-lora; and a complete cache fetches no object again.
    before = len(relay.requests())
    again = resolve_model_dir(f"s3://{name}/models/tiny", cache_dir=str(tmp_path / "cache"))
    assert again == got
    new = relay.requests()[before:]
    assert [m for m, _, _ in new] == ["GET"] and "list-type=2" in new[0][1]
    assert "prefix=models/tiny/" in new[0][1]
    # The repository form picks the same model by name, from the same cache.
    assert resolve_model_dir(f"s3://{name}/models", "tiny", cache_dir=str(tmp_path / "cache")) == got
    assert len(relay.object_gets(name)) == len(fetched)


def test_s3_killed_mid_download_leaves_nothing_loadable_and_the_next_start_resumes(s3, bucket, tmp_path,
                                                                                     monkeypatch):
    relay, _ = s3
    name, src = bucket
    cache = tmp_path / "cache"
    entry = cache / "s3" / name / "models" / "tiny"
    relay.kill_after = 2 << 20  # the store dies a third of the way into the big shard
    with pytest.raises(ModelSourceError) as e:
        resolve_model_dir(f"s3://{name}/models/tiny", cache_dir=str(cache))
    assert "\n" not in str(e.value) and "127.0.0.1" in str(e.value)
    assert not entry.exists()
    part = entry.with_name("tiny.kvserve-partial") / "model-00002-of-00002.safetensors.part"
    assert 0 < part.stat().st_size < BIG
    # Still down: no complete copy anywhere, so nothing is served.
    with pytest.raises(ModelSourceError, match="cannot reach the S3 endpoint"):
        resolve_model_dir(f"s3://{name}/models/tiny", cache_dir=str(cache))
    assert not entry.exists()

    back = Relay(relay.upstream, port=relay.port)  # the store is back, same address, same data
    try:
        got = resolve_model_dir(f"s3://{name}/models/tiny", cache_dir=str(cache))
        assert got == entry
        same_files(got, src)
        big = [h for m, p, h in back.requests() if p.endswith("model-00002-of-00002.safetensors")]
        assert len(big) == 1 and re.search(r"range: bytes=\d+-", big[0]) and "if-match" in big[0]
        # Down again: the complete copy keeps a restarting pod serving.
        back.kill()
        assert resolve_model_dir(f"s3://{name}/models/tiny", cache_dir=str(cache)) == entry
    finally:
        back.kill()


def test_s3_corrupted_transfer_fails_the_checksums(s3, bucket, tmp_path, moto_port):
    relay, _ = s3
    name, src = bucket
    relay.mangle = (b"MAGIC-MARKER", b"MAGIC-MARKEX")  # same length: only a checksum can tell
    with pytest.raises(ModelSourceError, match=r"checksum mismatch for models/tiny/generation_config.json: MD5"):
        resolve_model_dir(f"s3://{name}/models/tiny", cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / "s3" / name / "models" / "tiny").exists()
    # Uploaded with a CRC32 checksum (boto3's default): botocore checks it on the way in.
    upload(boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1"), name, src,
           "models/crc")
    with pytest.raises(ModelSourceError, match=r"checksum mismatch fetching s3://.*/models/crc from .*: Expected"):
        resolve_model_dir(f"s3://{name}/models/crc", cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / "s3" / name / "models" / "crc").exists()


def test_s3_wrong_credentials(s3, bucket, tmp_path, monkeypatch, moto_port):
    name, _ = bucket
    key = iam_key(moto_port)

    moto_auth(moto_port, "0")  # from now on moto checks every request against its IAM users
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        with pytest.raises(ModelSourceError) as e:
            resolve_model_dir(f"s3://{name}/models/tiny", cache_dir=str(tmp_path / "c"))
        assert "InvalidAccessKeyId" in str(e.value) and "AWS_ACCESS_KEY_ID" in str(e.value)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(ModelSourceError) as e:
            resolve_model_dir(f"s3://{name}/models/tiny", cache_dir=str(tmp_path / "c"))
        assert "SignatureDoesNotMatch" in str(e.value) and "AWS_SECRET_ACCESS_KEY" in str(e.value)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        assert resolve_model_dir(f"s3://{name}/models/tiny", cache_dir=str(tmp_path / "c")).is_dir()
    finally:
        moto_auth(moto_port, "inf")


def test_s3_missing_bucket_empty_prefix_and_unreachable_endpoint(s3, bucket, tmp_path, monkeypatch):
    name, _ = bucket
    with pytest.raises(ModelSourceError, match=r"bucket 'no-such-bucket' does not exist .*NoSuchBucket"):
        resolve_model_dir("s3://no-such-bucket/models/tiny", cache_dir=str(tmp_path))
    with pytest.raises(ModelSourceError, match=rf"nothing found under s3://{name}/models/tin/"):
        resolve_model_dir(f"s3://{name}/models/tin", cache_dir=str(tmp_path))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
    with pytest.raises(ModelSourceError, match=r"cannot reach the S3 endpoint http://127.0.0.1:\d+"):
        resolve_model_dir(f"s3://{name}/models/tiny", cache_dir=str(tmp_path))


def test_s3_kserve_endpoint_variables(s3, bucket, tmp_path, monkeypatch):
    """KServe's injection sets S3_ENDPOINT as host:port and S3_USE_HTTPS=0 for a plain-HTTP store."""
    relay, _ = s3
    name, src = bucket
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("S3_ENDPOINT", f"127.0.0.1:{relay.port}")
    monkeypatch.setenv("S3_USE_HTTPS", "0")
    monkeypatch.setenv("S3_VERIFY_SSL", "0")
    same_files(resolve_model_dir(f"s3://{name}/models/tiny/", cache_dir=str(tmp_path)), src)


def test_s3_refuses_bad_models_before_fetching_weights(s3, tmp_path):
    relay, admin = s3
    admin.create_bucket(Bucket="bad-models")
    upload(admin, "bad-models", make_model(tmp_path / "gpt2", arch="GPT2LMHeadModel"), "gpt2")
    pickled = make_model(tmp_path / "pickled")
    for f in pickled.glob("model*"):
        f.unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    upload(admin, "bad-models", pickled, "pickled")
    noconfig = make_model(tmp_path / "noconfig")
    (noconfig / "config.json").unlink()
    upload(admin, "bad-models", noconfig, "noconfig")

    with pytest.raises(ModelSourceError) as e:
        resolve_model_dir("s3://bad-models/gpt2", cache_dir=str(tmp_path / "c"))
    assert "unsupported architecture GPT2LMHeadModel" in str(e.value) and "LlamaForCausalLM" in str(e.value)
    assert relay.object_gets("bad-models") == ["gpt2/config.json"]
    with pytest.raises(ModelSourceError, match=r"only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        resolve_model_dir("s3://bad-models/pickled", cache_dir=str(tmp_path / "c"))
    assert not [p for p in relay.object_gets("bad-models") if p.endswith(".bin")]
    got = resolve_model_dir("s3://bad-models/pickled", cache_dir=str(tmp_path / "c"), allow_pickle=True)
    assert (got / "pytorch_model.bin").read_bytes() == b"\x80\x04K\x01."
    with pytest.raises(ModelSourceError, match=r"no config.json in s3://bad-models/noconfig/"):
        resolve_model_dir("s3://bad-models/noconfig", cache_dir=str(tmp_path / "c"))


# ------------------------------------------------------------------------------------------------------ local folders


def test_local_folder_and_model_repository(tmp_path, monkeypatch, caplog):
    repo = tmp_path / "repo"
    a, b = make_model(repo / "alpha"), make_model(repo / "beta", arch="Qwen3ForCausalLM")
    (repo / "notes").mkdir()
    assert resolve_model_dir(str(a)) == a
    assert resolve_model_dir(str(a), "other-name") == a  # a model folder is served whatever the name
    assert resolve_model_dir(f"file://{repo}", "beta") == b
    with pytest.raises(ModelSourceError, match=r"model repository holding alpha, beta: choose one with --model_name"):
        resolve_model_dir(str(repo))
    with pytest.raises(ModelSourceError, match=r"model 'gamma' not found in repository .* \(it holds alpha, beta\)"):
        resolve_model_dir(str(repo), "gamma")
    (repo / "beta" / "config.json").unlink()
    assert resolve_model_dir(str(repo)) == a  # one model: no name needed
    assert resolve_model_dir(str(repo), "my-isvc") == a  # nor a matching one (KServe passes the isvc name)
    with pytest.raises(ModelSourceError, match=r"model folder .*/nowhere does not exist"):
        resolve_model_dir(str(tmp_path / "nowhere"))
    with pytest.raises(ModelSourceError, match=r"no config.json in .*/notes"):
        resolve_model_dir(str(repo / "notes"))
    with pytest.raises(ModelSourceError, match=r"unsupported model source 'gs://b/m'"):
        resolve_model_dir("gs://b/m")


def test_check_model_dir_names_each_defect(tmp_path):
    good = make_model(tmp_path / "good")
    assert check_model_dir(good) == good
    assert read_settings(good) == {"max_model_len": 64}

    def broken(name, edit):
        folder = make_model(tmp_path / name)
        edit(folder)
        with pytest.raises(ModelSourceError) as e:
            check_model_dir(folder)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "no config.json" in broken("noconf", lambda f: (f / "config.json").unlink())
    assert "config.json is not valid JSON" in broken("badjson", lambda f: (f / "config.json").write_text("{"))
    assert "names no architectures" in broken("noarch", lambda f: (f / "config.json").write_text("{}"))
    msg = broken("gpt2", lambda f: (f / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}'))
    assert msg.startswith("unsupported architecture GPT2LMHeadModel in ")
    assert all(a in msg for a in sorted(supported_architectures()))
    assert "no tokenizer in" in broken("notok", lambda f: (f / "tokenizer.json").unlink())
    assert "lists missing shard(s): model-00002-of-00002.safetensors" in broken(
        "shard", lambda f: (f / "model-00002-of-00002.safetensors").unlink())

    def truncate(f):
        shard = f / "model-00002-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes()[:-100])
    assert "is truncated or corrupt" in broken("trunc", truncate)
    assert "kvserve.json is not valid JSON" in broken("settings", lambda f: (f / "kvserve.json").write_text("[1"))

    def pickle_only(f):
        for w in f.glob("model*"):
            w.unlink()
        (f / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    assert "--allow-pickle" in broken("pickle", pickle_only)
    assert check_model_dir(tmp_path / "pickle", allow_pickle=True)
    assert "no weights in" in broken("noweights", lambda f: [w.unlink() for w in f.glob("model*")])


# -------------------------------------------------------------------------------------------------------------- hf://

@pytest.fixture
def hub(tmp_path, monkeypatch):
    src = make_model(tmp_path / "hubsrc")
    files = repo_files(src)
    files.update({"README.md": b"# tiny", "onnx/model.onnx": b"onnx", "pytorch_model.bin": b"\x80\x04K\x01.",
                  "consolidated.safetensors": b"dup"})
    old = {n: b for n, b in files.items() if not n.startswith(("model", "consolidated"))}
    server = FakeHub({"org/tiny": files, "org/old": old})
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    yield server, src
    server.close()


def test_hf_revision_and_bare_id_fetch_serving_files_and_cache(hub, tmp_path, monkeypatch):
    server, src = hub
    got = resolve_model_dir(f"hf://org/tiny@{SHA}", cache_dir=str(tmp_path / "c"))
    assert got == tmp_path / "c" / "hf" / "models--org--tiny" / "snapshots" / SHA
    same_files(got, src)
    fetched = {p.split(f"/resolve/{SHA}/")[1] for meth, p in server.log if meth == "GET" and "/resolve/" in p}
    assert fetched == SERVING  # no README, no ONNX export, no pickle copy
    assert server.auth == {"Bearer hf_test_token"}

    assert resolve_model_dir("org/tiny", cache_dir=str(tmp_path / "c")) == got  # bare id, branch main

    server.log.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_dir("hf://org/tiny", cache_dir=str(tmp_path / "c")) == got
    assert server.log == []
    with pytest.raises(ModelSourceError, match=r"HF_HUB_OFFLINE is set and org/tiny is not .* cache .*cold"):
        resolve_model_dir("hf://org/tiny", cache_dir=str(tmp_path / "cold"))


def test_hf_missing_repo_revision_and_pickle_opt_in(hub, tmp_path):
    server, _ = hub
    with pytest.raises(ModelSourceError, match=rf"Hub repository org/nope not found at {server.url}"):
        resolve_model_dir("hf://org/nope", cache_dir=str(tmp_path))
    with pytest.raises(ModelSourceError, match=r"revision 'v9' not found in Hub repository org/tiny"):
        resolve_model_dir("hf://org/tiny@v9", cache_dir=str(tmp_path))
    with pytest.raises(ModelSourceError, match=r"only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        resolve_model_dir("hf://org/old", cache_dir=str(tmp_path))
    got = resolve_model_dir("hf://org/old", cache_dir=str(tmp_path), allow_pickle=True)
    assert (got / "pytorch_model.bin").is_file()
    server.close()
    with pytest.raises(ModelSourceError, match=r"cannot reach the Hub at .* and org/other is not"):
        resolve_model_dir("hf://org/other", cache_dir=str(tmp_path))
