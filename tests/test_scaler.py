"""The KEDA external scaler as KEDA sees it: a gRPC client built from the generated stubs talks to a
`kvserve scaler` process on loopback, which scrapes two predictor stand-ins (real HTTP servers on loopback
serving Prometheus text from their own registries, with a queue depth the test sets). Starting the command
costs the package import, so the tests that need other flags run the same servicer in-process."""
import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from kvserve.adapters.protos import externalscaler_pb2 as pb
from kvserve.adapters.protos import externalscaler_pb2_grpc as pb_grpc
from kvserve.adapters.scaler import METRIC_NAME, KubeEndpoints, QueueDepthScaler, Trigger, queue_depth, scaler_main

TIMEOUT = 10  # seconds for any single RPC


class LoopbackHTTP:
    """A threaded HTTP server on loopback answering GET with `respond(handler) -> (status, content type, body)`."""

    def __init__(self, respond):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                status, content_type, body = respond(self)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Predictor(LoopbackHTTP):
    """A loopback HTTP server exposing vllm:num_requests_{waiting,running} for one or more models."""

    def __init__(self, models=("m",)):
        self.registry = CollectorRegistry()
        self.waiting = Gauge("vllm:num_requests_waiting", "w", ["model_name"], registry=self.registry)
        self.running = Gauge("vllm:num_requests_running", "r", ["model_name"], registry=self.registry)
        for m in models:
            self.set(0, 0, m)
        super().__init__(lambda h: (200, "text/plain; version=0.0.4", generate_latest(self.registry))
                         if h.path == "/metrics" else (404, "text/plain; version=0.0.4", b"not found"))
        self.address = f"127.0.0.1:{self.port}"

    def set(self, waiting, running=0, model="m"):
        self.waiting.labels(model).set(waiting)
        self.running.labels(model).set(running)


class Scaler:
    """`kvserve scaler` in its own process; stderr (its log) goes to a file read after it stops."""

    def __init__(self, tmp_path, *args):
        self.log_path = tmp_path / "scaler.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "kvserve", "scaler", "--host", "127.0.0.1",
                                      "--port", "0", *args], stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()  # blocks until it listens (or dies: empty line)
        assert "listening on" in line, f"scaler did not start: {line!r} {self.log_path.read_text()}"
        self.address = line.split("listening on ")[1].split(",")[0]
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.ExternalScalerStub(self.channel)

    def stop(self) -> str:
        self.channel.close()
        self.proc.terminate()
        assert self.proc.wait(timeout=10) == 0  # SIGTERM is a clean stop
        self.log.close()
        return self.log_path.read_text()


class InProcessScaler:
    """The same servicer on a grpc.aio server in a background event loop of the test process."""

    def __init__(self, **kwargs):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def start():
            server = grpc.aio.server()
            pb_grpc.add_ExternalScalerServicer_to_server(QueueDepthScaler(**kwargs), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        self.server, port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(TIMEOUT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.ExternalScalerStub(self.channel)

    def stop(self):
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)


def ref(**metadata):
    return pb.ScaledObjectRef(name="llm-predictor", namespace="default",
                              scalerMetadata={"scalerAddress": "kvserve-scaler:9090", **metadata})


def metric(stub, **metadata) -> float:
    response = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(**metadata), metricName=METRIC_NAME),
                               timeout=TIMEOUT)
    [value] = response.metricValues
    assert value.metricName == METRIC_NAME
    assert value.metricValue == int(value.metricValueFloat)  # the deprecated int field carries it too
    return value.metricValueFloat


def active(stub, **metadata) -> bool:
    return stub.IsActive(ref(**metadata), timeout=TIMEOUT).result


@pytest.fixture
def predictors():
    ps = [Predictor(), Predictor()]
    yield ps
    for p in ps:
        p.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One scaler process over two predictors for the tests that need no special flags (a start costs
    an interpreter and the package import)."""
    a, b = Predictor(models=("m", "other")), Predictor(models=("m", "other"))
    scaler = Scaler(tmp_path_factory.mktemp("scaler"), "--targets", f"{a.address},{b.address}",
                    "--push-interval", "0.1")
    yield scaler, a, b
    log = scaler.stop()
    a.close()
    b.close()
    assert "unreachable" not in log


@pytest.fixture
def scaler(shared):
    _, a, b = shared
    for p in (a, b):
        for m in ("m", "other"):
            p.set(0, 0, m)
    return shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sums_queue_depth_and_goes_active_then_idle(scaler):
    scaler, a, b = scaler
    assert metric(scaler.stub) == 0
    assert active(scaler.stub) is False
    a.set(waiting=3, running=8)
    b.set(waiting=4, running=8)
    assert metric(scaler.stub) == 7
    assert active(scaler.stub) is True
    assert metric(scaler.stub, includeRunning="true") == 3 + 8 + 4 + 8
    assert active(scaler.stub, activationQueueDepth="7") is False  # 7 is not above 7
    assert active(scaler.stub, activationQueueDepth="6.5") is True
    a.set(0, 8)
    b.set(0, 8)
    assert metric(scaler.stub) == 0
    assert active(scaler.stub) is False
    assert active(scaler.stub, includeRunning="true") is True


def test_model_name_filter(scaler):
    scaler, a, b = scaler
    a.set(2, model="m")
    a.set(5, model="other")
    b.set(1, model="m")
    assert metric(scaler.stub) == 8
    assert metric(scaler.stub, modelName="m") == 3
    assert metric(scaler.stub, modelName="missing") == 0


def test_metric_spec_reflects_trigger_metadata(scaler):
    scaler, _, _ = scaler
    [spec] = scaler.stub.GetMetricSpec(ref(targetQueueDepth="5"), timeout=TIMEOUT).metricSpecs
    assert (spec.metricName, spec.targetSize, spec.targetSizeFloat) == (METRIC_NAME, 5, 5.0)
    [spec] = scaler.stub.GetMetricSpec(ref(targetQueueDepth="0.5"), timeout=TIMEOUT).metricSpecs
    assert (spec.targetSize, spec.targetSizeFloat) == (1, 0.5)
    [spec] = scaler.stub.GetMetricSpec(ref(), timeout=TIMEOUT).metricSpecs
    assert spec.targetSizeFloat == Trigger().target  # the documented default


def test_bad_metadata_is_a_clear_invalid_argument(scaler):
    scaler, _, _ = scaler
    for md, word in [({"targetQueueDepth": "lots"}, "targetQueueDepth"),
                     ({"targetQueueDepth": "0"}, "targetQueueDepth"),
                     ({"activationQueueDepth": "-1"}, "activationQueueDepth"),
                     ({"includeRunning": "yes"}, "includeRunning")]:
        for call in (lambda: scaler.stub.GetMetricSpec(ref(**md), timeout=TIMEOUT),
                     lambda: scaler.stub.IsActive(ref(**md), timeout=TIMEOUT)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert word in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        scaler.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(), metricName="cpu"), timeout=TIMEOUT)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and METRIC_NAME in e.value.details()
    assert metric(scaler.stub) == 0  # still serving


def test_stream_is_active_pushes_changes(scaler):
    scaler, a, b = scaler
    stream = scaler.stub.StreamIsActive(ref(activationQueueDepth="1"), timeout=30)
    try:
        assert next(stream).result is False  # the current state, at once
        a.set(1)
        time.sleep(0.5)  # 1 is not above the activation depth: nothing is pushed
        b.set(1)
        assert next(stream).result is True
        a.set(0)
        assert next(stream).result is False
    finally:
        stream.cancel()


def test_unreachable_predictor_counts_as_zero_and_is_logged_once(predictors, caplog):
    a, b = predictors
    dead = f"127.0.0.1:{free_port()}"
    scaler = InProcessScaler(targets=[a.address, dead, b.address], scrape_timeout=1)
    a.set(2)
    b.set(3)
    try:
        with caplog.at_level(logging.INFO, logger="kvserve.scaler"):
            for _ in range(3):
                assert metric(scaler.stub) == 5
            assert active(scaler.stub) is True
            b.close()  # a second predictor goes away under load
            assert metric(scaler.stub) == 2
            assert metric(scaler.stub) == 2
    finally:
        scaler.stop()
    log = caplog.text
    assert log.count(f"predictor {dead} unreachable") == 1
    assert log.count(f"predictor {b.address} unreachable") == 1


def test_no_predictors_configured_is_reported_not_crashed():
    scaler = InProcessScaler()
    try:
        for call in (lambda: scaler.stub.IsActive(ref(), timeout=TIMEOUT),
                     lambda: scaler.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref()), timeout=TIMEOUT)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "--targets" in e.value.details()
    finally:
        scaler.stop()


def test_bad_flags_fail_with_a_message(monkeypatch, capsys):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert scaler_main(["--port", "0", "--service", "llm-predictor"]) == 1
    assert "--targets" in capsys.readouterr().err
    assert scaler_main(["--targets", "127.0.0.1:1", "--scrape-timeout", "0"]) == 2
    assert scaler_main(["--targets", "127.0.0.1:1,predictor"]) == 2
    assert "predictor" in capsys.readouterr().err


def test_queue_depth_parses_vllm_text():
    text = ('# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n'
            '# TYPE vllm:num_requests_waiting gauge\n'
            'vllm:num_requests_waiting{model_name="a"} 3.0\n'
            'vllm:num_requests_waiting{model_name="b"} 1.0\n'
            '# TYPE vllm:num_requests_running gauge\n'
            'vllm:num_requests_running{model_name="a"} 4.0\n'
            '# TYPE vllm:request_success counter\n'
            'vllm:request_success_total{finished_reason="stop",model_name="a"} 9.0\n')
    assert queue_depth(text) == 4
    assert queue_depth(text, include_running=True) == 8
    assert queue_depth(text, include_running=True, model_name="a") == 7
    assert queue_depth("") == 0


class FakeKubeAPI(LoopbackHTTP):
    """Loopback stand-in for the API server's EndpointSlice list (plain HTTP, so TLS is not exercised)."""

    def __init__(self, slices):
        self.requests = []

        def respond(h):
            self.requests.append((h.path, h.headers.get("Authorization")))
            return 200, "application/json", json.dumps({"kind": "EndpointSliceList", "items": slices}).encode()

        super().__init__(respond)
        self.url = f"http://127.0.0.1:{self.port}"


def test_endpoint_slices_give_ready_addresses():
    slices = [{"addressType": "IPv4", "endpoints": [
                  {"addresses": ["10.0.0.5"], "conditions": {"ready": True}},
                  {"addresses": ["10.0.0.6"], "conditions": {"ready": False}},  # still loading its model
                  {"addresses": ["10.0.0.7"]}]},  # ready unknown counts as ready, as kube-proxy does
              {"addressType": "IPv6", "endpoints": [{"addresses": ["fd00::9"], "conditions": {"ready": True}}]},
              {"addressType": "IPv4", "endpoints": None}]
    api = FakeKubeAPI(slices)
    try:
        kube = KubeEndpoints(api.url, "sa-token")
        assert kube.addresses("llm-predictor", "team-a", 8080) == ["10.0.0.5:8080", "10.0.0.7:8080",
                                                                    "[fd00::9]:8080"]
        [(path, auth)] = api.requests
        assert path == ("/apis/discovery.k8s.io/v1/namespaces/team-a/endpointslices"
                        "?labelSelector=kubernetes.io/service-name%3Dllm-predictor")
        assert auth == "Bearer sa-token"
    finally:
        api.close()
