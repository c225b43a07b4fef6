"""The README's serve command (`make serve` runs `.venv/bin/kvserve serve`) with no arguments serves the
embedded default model and answers an OpenAI chat request; the command line maps flags, kvserve.json and
defaults onto the engine, and refuses what it cannot serve with one line."""
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from server import REPO, free_port, port_free, start_server


def test_serve_with_no_arguments_answers_chat():
    kvserve = Path(sys.executable).parent / "kvserve"
    assert kvserve.exists(), f"{kvserve} missing: is the package installed (make install)?"
    cmd = [str(kvserve), "serve"]
    http_port, grpc_port = 8080, 8081
    if not (port_free(http_port) and port_free(grpc_port)):
        # Something else holds KServe's default ports here; the command stays argument-free apart from them.
        http_port, grpc_port = free_port(), free_port()
        cmd += ["--http_port", str(http_port), "--grpc_port", str(grpc_port)]
    server = start_server(cmd=cmd, http_port=http_port, grpc_port=grpc_port)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["kvserve-tiny"]
        res = client.chat.completions.create(model="kvserve-tiny", max_tokens=8,
                                             messages=[{"role": "user", "content": "Hello! Who are you?"}])
        assert res.choices[0].message.role == "assistant"
        assert res.choices[0].finish_reason in ("stop", "length")
        assert 0 < res.usage.completion_tokens <= 8 and res.usage.prompt_tokens > 0
        assert res.choices[0].message.content or res.choices[0].finish_reason == "stop"
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
        assert models[0]["root"] == str(REPO / "model-repo" / "kvserve-tiny")
    finally:
        server.stop()


def test_flags_win_over_kvserve_json_over_defaults(monkeypatch):
    from kvserve.adapters.cli import build_parser, engine_config

    monkeypatch.setenv("KVSERVE_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--max-num-seqs", "3", "--no-enable-prefix-caching",
                                      "--lora-modules", "sql=/adapters/sql", "--dtype", "float32"])
    settings = {"max_num_seqs": 9, "max_model_len": 100, "served_model_name": "tiny", "block-size": 32}
    cfg = engine_config(args, Path("/models/m"), settings)
    assert (cfg.max_num_seqs, cfg.max_model_len, cfg.block_size) == (3, 100, 32)
    assert cfg.enable_prefix_caching is False and cfg.dtype == "float32" and cfg.served_model_name == "tiny"
    assert cfg.max_num_batched_tokens == 8192 and cfg.model == "/models/m"  # EngineConfig's defaults remain
    assert cfg.lora_modules == {"sql": "/adapters/sql"} and args.api_key == "from-env"
    with pytest.raises(ValueError, match="max_seqs"):
        engine_config(args, Path("/models/m"), {"max_seqs": 3})


@pytest.mark.parametrize("argv, words", [
    (["--workers", "2"], "--workers must be 1"),
    (["--model_dir", "/no/such/folder"], "/no/such/folder"),
    (["--model_dir", "gopher://host/model"], "unsupported model source"),
])
def test_bad_command_lines_fail_with_one_line(capsys, argv, words):
    from kvserve.adapters.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


@pytest.mark.parametrize("flags, word", [
    (["--block-size", "0"], "block_size"), (["--max-num-seqs", "0"], "max_num_seqs"),
    (["--block-size", "12"], "power of two"), (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
])
def test_impossible_engine_settings_are_one_error_line(capsys, flags, word):
    from kvserve.adapters.cli import main

    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and word in err[0], err


def test_missing_cuda_is_one_error_line():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    kvserve = Path(sys.executable).parent / "kvserve"
    proc = subprocess.run([str(kvserve), "serve", "--device", "cuda"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "CUDA" in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
