"""KV offload: chunks saved to host memory, a folder and an S3 bucket (moto's real server), restored instead of
recomputed, with the same outputs; and every way a tier can fail ends in a recompute, one log line, no error."""
import logging
import random
import shutil
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from moto.server import ThreadedMotoServer
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from fakes import S3_ENV_CLEARED, admin_client, s3_env
from kvserve import LLM, SamplingParams
from kvserve.adapters.metrics import EngineMetrics
from kvserve.runtime.config import EngineConfig
from kvserve.runtime.kv_offload import model_identity
from kvserve.runtime.sequence import Request, Sequence
from kvserve.runtime.stats import StepStats
from server import engine_flags, start_server

BS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
LOGGER = "kvserve.kv_offload"


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 384) for _ in range(n)]


def tokens(outputs) -> list[list[int]]:
    return [c.token_ids for o in outputs for c in o.outputs]


def engine(folder: str, **kw) -> LLM:
    """A small CPU engine; chunks of 64 tokens (4 blocks) unless told otherwise; loads forced (the CPU is no
    guide to what loading costs on a GPU)."""
    args = dict(block_size=BS, num_gpu_blocks_override=128, kv_offload_chunk_tokens=64, kv_offload_policy="always")
    return LLM(folder, **{**args, **kw})


def flush_gpu(llm: LLM) -> None:
    llm.engine.block_manager.reset_prefix_cache()


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_outputs_identical_with_offload_on_and_off(tiny_model):
    folder = tiny_model("llama")
    prompts = [prompt(10 + i, 160) for i in range(4)]  # 10 blocks each: together they fill the pool
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=7, n=2, max_tokens=4, ignore_eos=True)
    # a pool this small preempts as decode needs blocks: preempted sequences are saved and restored too
    small = dict(block_size=BS, num_gpu_blocks_override=40, max_num_batched_tokens=256, max_model_len=512)
    plain = LLM(folder, **small)
    expected = {id(p): tokens(plain.generate(prompts, p)) for p in (greedy, seeded)}
    llm = engine(folder, kv_offload_cpu_gb=0.25, **small)
    for p in (greedy, seeded, greedy):  # the first pass saves, the later ones restore
        flush_gpu(llm)
        assert tokens(llm.generate(prompts, p)) == expected[id(p)]
    s = llm.engine.stats()
    assert s.num_preemptions > 0
    assert s.kv_offload_hits["cpu"] > 0 and s.kv_offload_tokens_restored > 0
    # the same counters reach Prometheus as kvserve:kv_offload_* series
    name = f"kv-offload-{uuid.uuid4().hex[:8]}"
    EngineMetrics(name)(StepStats(s))
    got = {(m.name, m.labels.get("tier")): m.value for f in text_string_to_metric_families(
        generate_latest(REGISTRY).decode()) for m in f.samples if m.labels.get("model_name") == name}
    assert got[("kvserve:kv_offload_hits_total", "cpu")] == s.kv_offload_hits["cpu"]
    assert got[("kvserve:kv_offload_restored_tokens_total", None)] == s.kv_offload_tokens_restored
    assert got[("kvserve:kv_offload_saved_bytes_total", "cpu")] == s.kv_offload_bytes_saved["cpu"]


def test_flushed_prefix_restored_from_cpu_then_from_disk_after_restart(tiny_model, tmp_path):
    folder = tiny_model("llama")
    p = prompt(2, 2000)  # 125 full blocks: 7 chunks of 256 tokens (16 blocks); the 8th is not full
    kw = dict(num_gpu_blocks_override=160, kv_offload_chunk_tokens=256, kv_offload_cpu_gb=0.25,
              kv_offload_disk_path=str(tmp_path / "kv"))
    a = engine(folder, **kw)
    first = a.generate(p, GREEDY)[0]
    assert a.engine.computed_prompt_tokens == 2000
    assert a.engine.offload.flush(30)
    s = a.engine.stats()
    assert s.kv_offload_chunks_saved == {"cpu": 7, "disk": 7}
    assert len(list((tmp_path / "kv").glob("*.kvc"))) == 7

    flush_gpu(a)
    again = a.generate(p, GREEDY)[0]
    s = a.engine.stats()
    assert a.engine.computed_prompt_tokens == 2000 + 208  # only the tail after 7 * 256 restored tokens
    assert s.kv_offload_hits == {"cpu": 7} and s.kv_offload_tokens_restored == 1792
    assert s.kv_offload_bytes_loaded == {"cpu": 7 * 256 * 1024}  # 2 layers * K,V * 2 heads * 32 dims * fp32
    assert s.prefix_cache_hits == 0 and again.num_cached_tokens == 1792
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    del a

    b = engine(folder, **kw)  # a restart: nothing in the GPU cache or host memory, the same folder
    restored = b.generate(p, GREEDY)[0]
    s = b.engine.stats()
    assert b.engine.computed_prompt_tokens == 208
    assert s.kv_offload_hits == {"disk": 7} and s.kv_offload_tokens_restored == 1792
    assert s.kv_offload_chunks_saved == {"cpu": 7}  # promoted into host memory; nothing written to disk again
    assert restored.outputs[0].token_ids == first.outputs[0].token_ids
    flush_gpu(b)
    b.generate(p, GREEDY)
    assert b.engine.stats().kv_offload_hits == {"disk": 7, "cpu": 7}


# -- the remote tier on moto's S3 server ---------------------------------------------------------------------
@pytest.fixture
def s3_bucket(monkeypatch, tmp_path):
    """Points the environment an S3 client reads (fakes.s3_env) at a moto server's port, by the returned
    function, which also makes a fresh bucket there and returns a client straight to moto and the bucket."""
    for name in S3_ENV_CLEARED:
        monkeypatch.delenv(name, raising=False)

    def point_at(port: int):
        for name, value in s3_env(f"http://127.0.0.1:{port}", tmp_path / "none").items():
            monkeypatch.setenv(name, value)
        admin = admin_client(port)
        bucket = f"kv-{uuid.uuid4().hex[:12]}"
        admin.create_bucket(Bucket=bucket)
        return admin, bucket

    return point_at


def moto_server(port: int = 0) -> ThreadedMotoServer:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def moto_down(server: ThreadedMotoServer) -> None:
    server.stop()
    server._server.server_close()  # stop() leaves the socket listening: close it, the store is gone


def objects(admin, bucket: str) -> list[str]:
    return [o["Key"] for o in admin.list_objects_v2(Bucket=bucket).get("Contents", [])]


def wait_for_objects(admin, bucket: str, n: int, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(keys := objects(admin, bucket)) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    return keys


@pytest.mark.slow
def test_two_servers_share_one_bucket(tiny_model, s3_bucket):
    moto = moto_server()
    try:
        admin, bucket = s3_bucket(moto.get_host_and_port()[1])
        flags = ["--model_dir", tiny_model("llama"), "--model_name", "kv",
                 *engine_flags(max_model_len=1024, block_size=BS, kv_offload_remote=f"s3://{bucket}/replicas",
                               kv_offload_chunk_tokens=64, kv_offload_policy="always")]
        with ThreadPoolExecutor(2) as pool:
            servers = list(pool.map(lambda _: start_server(flags), range(2)))
        for s in servers:
            s.model = "kv"
        try:
            body = dict(model="kv", prompt=prompt(3, 300), max_tokens=5, temperature=0)  # 4 chunks of 64 tokens
            first = httpx.post(f"{servers[0].url}/openai/v1/completions", json=body, timeout=120)
            assert first.status_code == 200, first.text
            keys = wait_for_objects(admin, bucket, 4)
            assert len(keys) == 4 and all(k.startswith("replicas/") and k.endswith(".kvc") for k in keys)
            second = httpx.post(f"{servers[1].url}/openai/v1/completions", json=body, timeout=120)
            assert second.status_code == 200, second.text
            assert second.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
            s1, s2 = servers[0].stats(), servers[1].stats()
            assert s1["kv_offload_hits"] == {} and s1["kv_offload_misses"] == 1  # it computed and saved
            assert s2["kv_offload_hits"] == {"remote": 4} and s2["kv_offload_tokens_restored"] == 256
            assert s2["kv_offload_chunks_saved"] == {}  # it knows the bucket holds them
        finally:
            for s in servers:
                s.stop()
    finally:
        moto.stop()


def test_remote_tier_going_down_mid_run(tiny_model, s3_bucket, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    folder = tiny_model("llama")
    moto = moto_server()
    port = moto.get_host_and_port()[1]
    admin, bucket = s3_bucket(port)
    p, q = prompt(4, 300), prompt(5, 300)
    plain = LLM(folder, block_size=BS, num_gpu_blocks_override=128)
    want = {0: tokens(plain.generate(p, GREEDY)), 1: tokens(plain.generate(q, GREEDY))}
    llm = engine(folder, kv_offload_remote=f"s3://{bucket}")
    off = llm.engine.offload
    off.remote.retry_after_s = 0.5
    try:
        assert tokens(llm.generate(p, GREEDY)) == want[0]
        assert off.flush(30) and len(objects(admin, bucket)) == 4
        flush_gpu(llm)
        assert tokens(llm.generate(p, GREEDY)) == want[0]
        assert llm.engine.stats().kv_offload_hits == {"remote": 4}

        moto_down(moto)
        computed = llm.engine.computed_prompt_tokens
        for i, x in [(0, p), (1, q), (0, p)]:
            flush_gpu(llm)
            t = time.monotonic()
            assert tokens(llm.generate(x, GREEDY)) == want[i]
            assert time.monotonic() - t < 10  # failing fast, not waiting on timeouts and retries
        assert off.flush(30)
        assert llm.engine.computed_prompt_tokens - computed == 900  # all recomputed
        assert llm.engine.stats().kv_offload_hits == {"remote": 4}
        (line,) = warnings(caplog)
        assert f"s3://{bucket}" in line and "skipping the remote tier" in line

        # the store comes back (moto keeps its buckets in the process): after retry_after_s it is used again
        moto = moto_server(port)
        time.sleep(0.6)
        flush_gpu(llm)
        assert tokens(llm.generate(p, GREEDY)) == want[0]
        assert llm.engine.stats().kv_offload_hits == {"remote": 8}
        assert any("answers again" in r.getMessage() for r in caplog.records if r.name == LOGGER)
        assert len(warnings(caplog)) == 1
    finally:
        moto.stop()


# -- the disk tier failing -----------------------------------------------------------------------------------
def test_disk_cap_smaller_than_a_chunk_and_unusable_folder(tiny_model, tmp_path, caplog):
    folder = tiny_model("llama")
    p, q = prompt(6, 300), prompt(7, 300)
    want = tokens(LLM(folder, block_size=BS, num_gpu_blocks_override=128).generate([p, q], GREEDY))

    tiny = engine(folder, kv_offload_disk_path=str(tmp_path / "tiny"), kv_offload_disk_gb=1e-7)  # ~107 bytes
    assert tokens(tiny.generate([p, q], GREEDY)) == want
    assert tiny.engine.offload.flush(30)
    assert tiny.engine.stats().kv_offload_chunks_saved == {}
    (line,) = warnings(caplog)  # eight chunks refused, one line
    assert "exceeds the disk tier's cap" in line

    caplog.clear()
    (tmp_path / "file").write_text("not a folder")
    broken = engine(folder, kv_offload_disk_path=str(tmp_path / "file" / "kv"))
    assert tokens(broken.generate([p, q], GREEDY)) == want
    (line,) = warnings(caplog)
    assert "running without the disk tier" in line and str(tmp_path / "file" / "kv") in line


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 300 KiB tmpfs (room for 4 chunks of 64 KiB); skipped where mounting is not allowed."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs CAP_SYS_ADMIN")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_disk_filling_up_then_read_only(tiny_model, small_tmpfs, caplog):
    folder = tiny_model("llama")
    prompts = [prompt(20 + i, 300) for i in range(4)]
    want = tokens(LLM(folder, block_size=BS, num_gpu_blocks_override=128).generate(prompts, GREEDY))
    llm = engine(folder, kv_offload_disk_path=str(small_tmpfs))  # its cap (10 GiB) is not what stops it
    off = llm.engine.offload
    assert tokens(llm.generate(prompts[:2], GREEDY)) == want[:2]
    assert off.flush(30)
    (line,) = warnings(caplog)
    assert "No space left on device" in line
    saved = llm.engine.stats().kv_offload_chunks_saved["disk"]
    assert 1 <= saved < 8
    assert not list(small_tmpfs.glob("*.tmp"))  # no half-written file left behind
    # from now on the tier keeps to what fits, evicting its oldest chunks: saves go on
    assert tokens(llm.generate(prompts[2:3], GREEDY)) == want[2:3]
    assert off.flush(30) and llm.engine.stats().kv_offload_chunks_saved["disk"] > saved

    caplog.clear()
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)]).returncode == 0
    before = llm.engine.stats().kv_offload_chunks_saved["disk"]
    assert tokens(llm.generate(prompts[3:], GREEDY)) == want[3:]
    assert off.flush(30)
    (line,) = warnings(caplog)
    assert "Read-only file system" in line
    assert llm.engine.stats().kv_offload_chunks_saved["disk"] == before


def test_corrupt_truncated_and_misnamed_chunks_are_misses(tiny_model, tmp_path, caplog):
    folder = tiny_model("llama")
    disk = tmp_path / "kv"
    prompts = [prompt(30 + i, 330) for i in range(4)]  # 20 full blocks each: 5 chunks
    want = tokens(LLM(folder, block_size=BS, num_gpu_blocks_override=128).generate(prompts, GREEDY))
    a = engine(folder, kv_offload_disk_path=str(disk))
    assert tokens(a.generate(prompts, GREEDY)) == want
    assert a.engine.offload.flush(30)
    keys = [a.engine.offload.chunk_keys(a.engine.make_request(x, GREEDY, str(i)).seqs[0], 5)
            for i, x in enumerate(prompts)]
    assert len(list(disk.glob("*.kvc"))) == 20
    del a

    for k in (keys[0][0], keys[1][0]):  # flipped bytes in the payload of two first chunks
        data = bytearray((disk / f"{k}.kvc").read_bytes())
        data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])
        (disk / f"{k}.kvc").write_bytes(bytes(data))
    path = disk / f"{keys[2][1]}.kvc"  # the second chunk of the third prompt cut short
    path.write_bytes(path.read_bytes()[:5000])
    shutil.copy(disk / f"{keys[0][1]}.kvc", disk / f"{keys[3][0]}.kvc")  # a chunk under another's name

    b = engine(folder, kv_offload_disk_path=str(disk))
    assert tokens(b.generate(prompts, GREEDY)) == want
    s = b.engine.stats()
    assert s.kv_offload_hits == {"disk": 1}  # only the third prompt's first chunk was sound
    assert b.engine.computed_prompt_tokens == 4 * 330 - 64
    lines = warnings(caplog)
    assert len(lines) == 3, lines  # corrupt twice, truncated, mismatched: one line per cause
    assert sum(" is corrupt: payload checksum mismatch" in x for x in lines) == 1
    assert sum(" is truncated: " in x for x in lines) == 1
    assert sum("holds chunk" in x for x in lines) == 1
    # the bad files were removed and written again, sound, when the prompts finished
    assert b.engine.offload.flush(30)
    c = engine(folder, kv_offload_disk_path=str(disk))
    assert tokens(c.generate(prompts, GREEDY)) == want
    assert c.engine.stats().kv_offload_hits == {"disk": 20}


def test_chunks_never_cross_models_or_adapters(tiny_model, tmp_path, caplog):
    folder = tiny_model("llama")
    # the same config.json, other weights: a fine-tune's situation
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    weights = load_file(other / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in weights.items()},
              other / "model.safetensors", metadata={"format": "pt"})
    disk = tmp_path / "kv"
    p = prompt(40, 300)
    a = engine(folder, kv_offload_disk_path=str(disk))
    a.generate(p, GREEDY)
    assert a.engine.offload.flush(30)
    b = engine(str(other), kv_offload_disk_path=str(disk))
    key_a = a.engine.offload.chunk_keys(a.engine.make_request(p, GREEDY, "a").seqs[0], 4)
    key_b = b.engine.offload.chunk_keys(b.engine.make_request(p, GREEDY, "b").seqs[0], 4)
    assert not set(key_a) & set(key_b)
    shutil.copy(disk / f"{key_a[0]}.kvc", disk / f"{key_b[0]}.kvc")  # model a's chunk where b looks

    want = tokens(LLM(str(other), block_size=BS, num_gpu_blocks_override=128).generate(p, GREEDY))
    assert tokens(b.generate(p, GREEDY)) == want
    s = b.engine.stats()
    assert s.kv_offload_hits == {} and s.kv_offload_misses == 1 and b.engine.computed_prompt_tokens == 300
    (line,) = warnings(caplog)
    assert "written by another model" in line
    assert b.engine.offload.flush(30)
    assert {f.stem for f in disk.glob("*.kvc")} == set(key_a) | set(key_b)

    # adapters: the same tokens under another adapter name other chunks
    off = a.engine.offload

    def keys(lora):
        req = Request("r", None, p, GREEDY, 0.0, lora)
        return off.chunk_keys(Sequence(0, req, 0, list(p), 0), 4)

    assert keys(None) == key_a and keys("sql") == keys("sql")
    assert not set(keys("sql")) & set(key_a) and not set(keys("sql")) & set(keys("poem"))
    # dtype and block layout are part of the identity too
    config = EngineConfig(model=folder)
    cpu = torch.device("cpu")
    layout = dict(block_size=16, chunk_blocks=4, layers=2, kv_heads=2, head_dim=32)
    ids = {model_identity(config, torch.float32, cpu, layout), model_identity(config, torch.bfloat16, cpu, layout),
           model_identity(config, torch.float32, cpu, {**layout, "block_size": 32}),
           model_identity(EngineConfig(model=str(other)), torch.float32, cpu, layout)}
    assert len(ids) == 4


def test_stalled_writer_drops_saves_and_never_blocks_steps(tiny_model, tmp_path):
    folder = tiny_model("llama")
    llm = engine(folder, kv_offload_disk_path=str(tmp_path / "kv"))
    off = llm.engine.offload
    off.writer.max_bytes = 2 * off.spec.nbytes  # room for two chunks in flight
    release = threading.Event()
    put = off.disk.put

    def stalled_put(*args):
        release.wait(60)  # a disk that stopped answering
        return put(*args)

    off.disk.put = stalled_put
    prompts = [prompt(50 + i, 300) for i in range(4)]  # 4 chunks each: 16 saves
    want = tokens(LLM(folder, block_size=BS, num_gpu_blocks_override=128).generate(prompts, GREEDY))
    t = time.monotonic()
    assert tokens(llm.generate(prompts, GREEDY)) == want
    assert time.monotonic() - t < 30 and not release.is_set()  # served while the writer is stuck
    s = llm.engine.stats()
    assert s.kv_offload_saves_dropped == 14 and s.kv_offload_chunks_saved == {}
    release.set()
    assert off.flush(30)
    assert llm.engine.stats().kv_offload_chunks_saved == {"disk": 2}


def test_load_or_recompute_choice(tiny_model):
    folder = tiny_model("llama")
    llm = engine(folder, kv_offload_cpu_gb=0.1, kv_offload_policy="auto")
    off = llm.engine.offload
    p = prompt(60, 300)  # 4 chunks: 256 tokens restorable, 44 to compute
    llm.generate(p, GREEDY)
    assert off.s_per_token is not None and off.s_per_token > 0  # measured on the 300-token prefill step
    assert off.load_estimate("cpu") < off.load_estimate("disk") < off.load_estimate("remote")

    off.s_per_token = 1e-12  # recomputing looks free: the chunk held in host memory is recomputed
    flush_gpu(llm)
    before = llm.engine.computed_prompt_tokens
    llm.generate(p, GREEDY)
    s = llm.engine.stats()
    assert llm.engine.computed_prompt_tokens - before == 300
    assert s.kv_offload_recomputed == 1 and s.kv_offload_hits == {}

    off.s_per_token = 1.0  # a second a token: loading wins
    flush_gpu(llm)
    before = llm.engine.computed_prompt_tokens
    llm.generate(p, GREEDY)
    assert llm.engine.computed_prompt_tokens - before == 44
    assert llm.engine.stats().kv_offload_hits == {"cpu": 4}
