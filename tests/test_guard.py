"""What gets in, against a real server with an API key, a small body limit, `--max-n 4`, and room for only two
running and two waiting requests: the key on every protocol (401 / UNAUTHENTICATED without it, served with it,
health and metrics open), the request limits (each a 4xx naming what is wrong), per-request deadlines (cut off
with 504 / DEADLINE_EXCEEDED, blocks freed), and the admission bound (503 + Retry-After, 429 on OpenAI,
RESOURCE_EXHAUSTED on gRPC, while admitted requests complete)."""
import asyncio
import json
import time

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server import MODEL_DIR, engine_flags, grpc_text, start_server

KEY = "kv-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}  # tritonclient adds to the dicts it is given: pass copies
GRPC_AUTH = {"authorization": f"Bearer {KEY}"}
MAX_BYTES = 8192


@pytest.fixture(scope="module")
def server():
    s = start_server(["--model_dir", str(MODEL_DIR), *engine_flags(max_num_seqs=2), "--api-key", KEY,
                      "--max-request-bytes", str(MAX_BYTES), "--max-n", "4", "--max-waiting-requests", "2"])
    yield s
    s.stop()


def _v2_body(prompt="The lighthouse keeper", **parameters):
    return {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [prompt]}],
            "parameters": {"max_tokens": 2, **parameters}}


def _post(server, path, body, headers=AUTH, **kw):
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60, **kw)


def _routes(server):
    m = server.model
    return [(f"/v2/models/{m}/infer", _v2_body(), "kserve"),
            (f"/v2/models/{m}/generate", {"text_input": "Hi", "max_tokens": 2}, "kserve"),
            (f"/v2/models/{m}/generate_stream", {"text_input": "Hi", "max_tokens": 2}, "kserve"),
            ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}, "openai"),
            ("/openai/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
             "openai"),
            ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"}, "openai"),
            ("/v2/repository/models/x/load", {}, "kserve")]


# -- the API key ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}],
                         ids=["no-key", "wrong-key", "no-scheme"])
def test_http_refused_without_the_key(server, headers):
    for path, body, shape in _routes(server):
        r = _post(server, path, body, headers=headers)
        assert r.status_code == 401, (path, r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        message = error["message"] if shape == "openai" else error
        assert "API key" in message, (path, r.text)
        if shape == "openai":
            assert error["type"] == "authentication_error"
    r = httpx.get(f"{server.url}/v1/models", headers=headers)
    assert r.status_code == 401, r.text


def test_http_served_with_the_key(server):
    for path, body, _ in _routes(server)[:5]:
        r = _post(server, path, body)
        assert r.status_code == 200, (path, r.text)
    # the SDKs: the key travels as they send it
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=server.model, prompt="Hi", max_tokens=2).choices[0].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).completions.create(
            model=server.model, prompt="Hi", max_tokens=2)
    http = httpclient.InferenceServerClient(server.http_addr)
    inp = httpclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array(["Hi"], dtype=np.object_))
    assert http.infer(server.model, [inp], headers=dict(AUTH), parameters={"max_tokens": 2}).as_numpy("text_output")
    with pytest.raises(InferenceServerException, match="API key"):
        http.infer(server.model, [inp], parameters={"max_tokens": 2})


def test_grpc_needs_the_key(server):
    client = grpcclient.InferenceServerClient(server.grpc_addr)
    for headers in (None, {"authorization": "Bearer wrong-key"}):
        with pytest.raises(InferenceServerException) as err:
            client.infer(server.model, [grpc_text()], headers=headers, parameters={"max_tokens": 2})
        assert err.value.status() == "StatusCode.UNAUTHENTICATED", err.value
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata(server.model, headers=headers)
        assert err.value.status() == "StatusCode.UNAUTHENTICATED", err.value
    res = client.infer(server.model, [grpc_text()], headers=GRPC_AUTH, parameters={"max_tokens": 2})
    assert res.as_numpy("text_output")[0]
    # health stays open, as over HTTP
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(server.model)


def test_health_metrics_and_schema_stay_open(server):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{server.model}/ready", "/metrics",
                 f"/v2/models/{server.model}/stats", "/openapi.json"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path


# -- limits -----------------------------------------------------------------------------------------------------
def test_body_size_limit(server):
    big = {"text_input": "x" * MAX_BYTES, "max_tokens": 2}
    r = _post(server, f"/v2/models/{server.model}/generate", big)
    assert r.status_code == 413 and "bytes" in r.json()["error"], r.text
    r = _post(server, "/v1/completions", {"prompt": "x" * MAX_BYTES})
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"], r.text

    def chunks(n):  # no Content-Length: the limit counts what arrives
        yield b'{"text_input": "'
        yield b"y" * n
        yield b'", "max_tokens": 2}'
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(f"{server.url}/v2/models/{server.model}/generate", content=chunks(MAX_BYTES), headers=headers)
    assert r.status_code == 413, r.text
    r = httpx.post(f"{server.url}/v2/models/{server.model}/generate", content=chunks(100), headers=headers)
    assert r.status_code == 200, r.text


STOP17 = [f"s{i}" for i in range(17)]


@pytest.mark.parametrize("path, body, words", [
    ("/v1/completions", {"prompt": "Hi", "n": 5, "max_tokens": 2}, ["n must be at most 4", "5"]),
    ("/v1/completions", {"prompt": "Hi", "stop": STOP17}, ["stop", "16", "17"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stop": ["z" * 300]},
     ["stop", "256", "300"]),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 600}, ["max_tokens", "max_model_len", "512"]),
    ("/v1/completions", {"prompt": "word " * 300, "max_tokens": 300}, ["max_tokens", "at most"]),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, ["logprobs", "21", "20"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
                              "top_logprobs": 21}, ["logprobs", "21"]),
    ("/v1/completions", {"prompt": "Hi", "timeout": -1}, ["timeout", "-1"]),
    ("/v2/models/{m}/generate", {"text_input": "Hi", "max_tokens": 511}, ["max_tokens", "max_model_len"]),
    ("/v2/models/{m}/generate", {"text_input": "Hi", "stop": STOP17}, ["stop", "17"]),
    ("/v2/models/{m}/generate", {"text_input": "Hi", "timeout": 0}, ["timeout"]),
    ("/v2/models/{m}/generate_stream", {"text_input": "Hi", "parameters": {"max_tokens": 999}}, ["max_tokens"]),
    ("/v2/models/{m}/infer", _v2_body(max_tokens=511), ["max_tokens", "max_model_len"]),
    ("/v2/models/{m}/infer", _v2_body(timeout="soon"), ["timeout", "soon"]),
    ("/v2/models/{m}/generate", {"text_input": "Hi", "id": "caf\u00e9 \u2603"}, ["request id", "ASCII"]),
    ("/v2/models/{m}/infer", {**_v2_body(), "id": "a\r\nSet-Cookie: x"}, ["request id", "ASCII"]),
], ids=["n", "stop-count", "stop-length", "max_tokens-over-context", "prompt-plus-max_tokens", "logprobs",
        "top_logprobs", "timeout-negative", "generate-max_tokens", "generate-stop-count", "generate-timeout-zero",
        "stream-max_tokens", "v2-max_tokens", "v2-timeout-text", "generate-id-not-ascii", "v2-id-header-injection"])
def test_limits(server, path, body, words):
    r = _post(server, path.format(m=server.model), body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error["message"] if path.startswith("/v1") else error
    assert all(w in message for w in words), message


def test_grpc_limits_and_invalid_utf8(server):
    client = grpcclient.InferenceServerClient(server.grpc_addr)
    cases = [([grpc_text()], {"max_tokens": 600}, ["max_tokens", "max_model_len"])]
    bad = grpcclient.InferInput("text_input", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"ok \xff\xfe"], dtype=np.object_))
    cases.append(([bad], {"max_tokens": 2}, ["text_input", "UTF-8"]))
    stop = grpcclient.InferInput("stop", [1], "BYTES")
    stop.set_data_from_numpy(np.array([b"\xc3("], dtype=np.object_))
    cases.append(([grpc_text(), stop], {"max_tokens": 2}, ["stop", "UTF-8"]))
    for inputs, parameters, words in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer(server.model, inputs, headers=GRPC_AUTH, parameters=parameters)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
        assert all(w in err.value.message() for w in words), err.value.message()
    with pytest.raises(InferenceServerException) as err:  # tritonclient's `timeout` (microseconds)
        client.infer(server.model, [grpc_text()], headers=GRPC_AUTH, timeout=-5, parameters={"max_tokens": 2})
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "timeout" in err.value.message(), err.value


def test_rest_binary_invalid_utf8(server):
    """REST with binary tensors: raw bytes reach the server as they are, and invalid UTF-8 is a 400."""
    client = httpclient.InferenceServerClient(server.http_addr)
    inp = httpclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"ok \xff\xfe"], dtype=np.object_), binary_data=True)
    with pytest.raises(InferenceServerException) as err:
        client.infer(server.model, [inp], headers=dict(AUTH), parameters={"max_tokens": 2})
    assert "400" in str(err.value.status()) and "text_input" in err.value.message() \
        and "UTF-8" in err.value.message(), err.value


# -- deadlines --------------------------------------------------------------------------------------------------
LONG = 400  # tokens, ~2 s on the tiny model: far past a 0.2 s deadline


def _rejected(server) -> dict[str, float]:
    """kvserve:requests_rejected_total by reason, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "kvserve:requests_rejected" for s in f.samples if s.name.endswith("_total")}


def test_deadlines_cut_requests_off_and_free_blocks(server):
    rejected = _rejected(server)
    before = server.assert_idle()
    m = server.model
    started = time.monotonic()
    r = _post(server, f"/v2/models/{m}/generate", {"text_input": "Deadline", "max_tokens": LONG,
                                                    "ignore_eos": True, "timeout": 0.2})
    assert r.status_code == 504 and "timeout of 0.2 s" in r.json()["error"], r.text
    r = _post(server, "/v1/completions", {"prompt": "Deadline", "max_tokens": LONG, "ignore_eos": True,
                                          "timeout": 0.2})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    r = _post(server, f"/v2/models/{m}/infer", _v2_body("Deadline", max_tokens=LONG, ignore_eos=True,
                                                         timeout=200_000))  # microseconds, as Triton counts
    assert r.status_code == 504 and "timeout" in r.json()["error"], r.text
    with pytest.raises(InferenceServerException) as err:  # tritonclient's own `timeout`: microseconds
        grpcclient.InferenceServerClient(server.grpc_addr).infer(
            m, [grpc_text("Deadline")], headers=GRPC_AUTH, timeout=200_000,
            parameters={"max_tokens": LONG, "ignore_eos": True})
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED", err.value
    # a stream that has started ends with the error as its last event
    with httpx.stream("POST", f"{server.url}/v2/models/{m}/generate_stream", headers=AUTH, timeout=60,
                      json={"text_input": "Deadline", "max_tokens": LONG, "ignore_eos": True, "timeout": 0.2}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "timeout" in events[-1]["error"] and len(events) < LONG, events[-1]
    elapsed = time.monotonic() - started
    assert _rejected(server)["deadline"] - rejected["deadline"] == 5  # REST x3, gRPC, the stream
    after = server.assert_idle()
    generated = after["generation_tokens"] - before["generation_tokens"]
    assert generated < 5 * LONG // 2, f"{generated} tokens: the requests ran on after their deadlines"
    assert elapsed < 5 * 1.5, f"five 0.2 s deadlines took {elapsed:.1f}s"


# -- admission --------------------------------------------------------------------------------------------------
def test_admission_bound(server):
    """Two requests run and two wait: one more is refused on every protocol, the four complete."""
    m = server.model

    async def in_engine(http) -> int:
        stats = (await http.get(f"/v2/models/{m}/stats")).json()
        return stats["num_running"] + stats["num_waiting"]

    async def until_in_engine(http, n):
        deadline = time.monotonic() + 60
        while await in_engine(http) < n:
            assert time.monotonic() < deadline, f"fewer than {n} requests reached the engine"
            await asyncio.sleep(0.005)

    async def long_one(http, i):  # ~2.5 s of decoding each, far longer than the refusals take
        r = await http.post(f"/v2/models/{m}/generate", json={"text_input": f"Hold the line {i}",
                                                               "max_tokens": 480, "ignore_eos": True})
        return r.status_code

    async def refusals(http):
        out = {}
        r = await http.post(f"/v2/models/{m}/generate", json={"text_input": "one more", "max_tokens": 2})
        out["generate"] = (r.status_code, r.headers.get("retry-after"), r.json()["error"])
        r = await http.post(f"/v2/models/{m}/generate_stream", json={"text_input": "one more", "max_tokens": 2})
        out["generate_stream"] = (r.status_code, r.headers.get("retry-after"), r.json()["error"])
        r = await http.post(f"/v2/models/{m}/infer", json=_v2_body("one more"))
        out["infer"] = (r.status_code, r.headers.get("retry-after"), r.json()["error"])
        for path, body in (("/v1/completions", {"prompt": "one more", "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "one more"}]})):
            r = await http.post(path, json=body)
            out[path] = (r.status_code, r.headers.get("retry-after"), r.json()["error"]["message"],
                         r.json()["error"]["type"])
        grpc = grpcaio.InferenceServerClient(server.grpc_addr)
        try:
            await grpc.infer(m, [grpc_text("one more")], headers=GRPC_AUTH, parameters={"max_tokens": 2})
            out["grpc"] = ("served",)
        except InferenceServerException as e:
            out["grpc"] = (e.status(), e.message())
        await grpc.close()
        return out

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as http:
            # two at a time: requests the engine has not seen yet count as waiting, so a burst of four would
            # already overflow a bound of two
            longs = [asyncio.create_task(long_one(http, i)) for i in (0, 1)]
            await until_in_engine(http, 2)
            longs += [asyncio.create_task(long_one(http, i)) for i in (2, 3)]
            await until_in_engine(http, 4)
            out = await refusals(http)
            return await asyncio.gather(*longs), out

    rejected = _rejected(server)
    statuses, out = asyncio.run(run())
    assert _rejected(server)["overloaded"] - rejected["overloaded"] == 6  # every refusal below, counted once
    for route in ("generate", "generate_stream", "infer"):
        status, retry_after, message = out[route]
        assert (status, retry_after) == (503, "1") and "max_waiting_requests" in message, (route, out[route])
    for route in ("/v1/completions", "/v1/chat/completions"):
        status, retry_after, message, kind = out[route]
        assert (status, retry_after, kind) == (429, "1", "rate_limit_exceeded"), (route, out[route])
    assert out["grpc"][0] == "StatusCode.RESOURCE_EXHAUSTED", out["grpc"]
    assert statuses == [200] * 4
    server.assert_idle()


def test_burst_some_refused_rest_served(server):
    """A burst of 24 over generate and OpenAI: some are refused (requests that arrive together all wait until
    the engine's next step), every other one completes."""
    m = server.model

    async def one(http, i):
        if i % 2:
            r = await http.post(f"/v2/models/{m}/generate", json={"text_input": f"Burst {i}", "max_tokens": 40,
                                                                   "ignore_eos": True})
            return r.status_code, r.headers.get("retry-after"), r.json()
        r = await http.post("/v1/completions", json={"prompt": f"Burst {i}", "max_tokens": 40, "ignore_eos": True})
        return r.status_code, r.headers.get("retry-after"), r.json()

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as http:
            return await asyncio.gather(*[one(http, i) for i in range(24)])

    results = asyncio.run(run())
    served = [body for status, _, body in results if status == 200]
    refused = [(status, retry) for status, retry, _ in results if status != 200]
    assert len(served) >= 2 and refused, [r[0] for r in results]
    assert set(refused) <= {(503, "1"), (429, "1")}, refused
    for body in served:  # admitted requests ran to their end
        usage = body["usage"]
        assert usage["completion_tokens"] == 40, body
    server.assert_idle()
    server.assert_alive()
