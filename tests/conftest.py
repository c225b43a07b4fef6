import os
import sys

import pytest
import torch

# Triton kernels run under the interpreter when there is no GPU; it must be set before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
sys.path.insert(0, os.path.dirname(__file__))  # test helpers (tiny_models, server) import by plain name


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Build (once per session) a tiny random-weight HF model folder of the given shape."""
    from tiny_models import build_model

    cache: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in cache:
            cache[kind] = build_model(str(tmp_path_factory.mktemp(kind)), kind)
        return cache[kind]

    return get


@pytest.fixture
def backend():
    """ops.set_backend, for a test to pick the kernels' backend; the one before is set again after the test."""
    from kvserve.kernels import ops

    old = ops.get_backend()
    yield ops.set_backend
    ops.set_backend(old)


@pytest.fixture(scope="module")
def server():
    """A real `kvserve serve` on the embedded model, on free loopback ports, for one test module."""
    from server import start_server

    s = start_server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm():
    """The offline engine with the server's settings: the reference for what the server must answer."""
    from server import ENGINE, MODEL_DIR

    from kvserve import LLM

    return LLM(str(MODEL_DIR), **ENGINE)


@pytest.fixture(scope="module")
def moto_port():
    """moto's real S3 HTTP server on a free loopback port, for one test module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server.get_host_and_port()[1]
    server.stop()
