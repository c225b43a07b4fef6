"""Start `kvserve serve` as a real subprocess on free loopback ports, for tests that talk to it with real clients.

Never import kserve in a test process: its gRPC protos and tritonclient's register the same names in
protobuf's default pool, and the second import fails.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = Path(os.environ.get("KVSERVE_TEST_MODEL_DIR", REPO / "model-repo" / "kvserve-tiny"))
MODEL_NAME = "kvserve-tiny"  # the served_model_name in the model's kvserve.json

# Small, deterministic engine settings every server and reference LLM of the tests share.
ENGINE = {"device": "cpu", "dtype": "float32", "max_model_len": 512, "max_num_seqs": 8,
          "num_gpu_blocks_override": 128}


def engine_flags(**overrides) -> list[str]:
    flags = []
    for key, value in {**ENGINE, **overrides}.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


@dataclass
class Server:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    log_path: str
    model: str = MODEL_NAME

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def http_addr(self) -> str:  # tritonclient.http takes host:port
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_addr(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stats(self) -> dict:
        r = httpx.get(f"{self.url}/v2/models/{self.model}/stats", timeout=10)
        r.raise_for_status()
        return r.json()

    def assert_idle(self, timeout: float = 30.0) -> dict:
        """Waits up to `timeout` s (0: looks once) for the engine to hold no running or waiting request and
        every KV block to be free, asserts it, and returns the stats it last read."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            idle = (stats["num_running"] == 0 and stats["num_waiting"] == 0
                    and stats["num_free_blocks"] == stats["num_total_blocks"])
            if idle or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
        assert stats["num_free_blocks"] == stats["num_total_blocks"], stats
        return stats

    def log_tail(self, n: int = 4000) -> str:
        return Path(self.log_path).read_text(errors="replace")[-n:]

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.log_tail()}"
        assert httpx.get(f"{self.url}/v2/health/ready", timeout=10).status_code == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        Path(self.log_path).unlink(missing_ok=True)


def grpc_text(prompt: str = "The lighthouse keeper"):
    """A one-element BYTES `text_input` for tritonclient.grpc's infer."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([prompt], dtype=np.object_))
    return inp


def start_server(args: list[str] | None = None, http_port: int | None = None, grpc_port: int | None = None,
                 timeout: float = 180, cmd: list[str] | None = None) -> Server:
    """`kvserve serve --http_port H --grpc_port G ARGS` (ARGS default: the test model, small engine), or `cmd`
    verbatim listening on the ports given; returns once /v2/health/ready answers 200."""
    http_port = http_port or free_port()
    grpc_port = grpc_port or free_port()
    if cmd is None:
        cmd = [sys.executable, "-m", "kvserve", "serve", "--http_port", str(http_port),
               "--grpc_port", str(grpc_port), *(args if args is not None else
                                                ["--model_dir", str(MODEL_DIR), *engine_flags()])]
    log = tempfile.NamedTemporaryFile("wb", prefix="kvserve-test-", suffix=".log", delete=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    server = Server(proc, http_port, grpc_port, log.name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kvserve serve exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"kvserve serve not ready after {timeout}s")
