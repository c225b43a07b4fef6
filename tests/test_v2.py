"""KServe v2 infer over REST and gRPC with tritonclient, against the real server: batches of prompts answer what
the offline LLM answers, metadata describes the tensors, and malformed requests get 4xx naming the problem."""
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kvserve.runtime.sampling_params import SamplingParams

PROMPTS = ["The lighthouse keeper", "Kubernetes schedules", "To water tomatoes you"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def offline(llm):
    return llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))


@pytest.fixture(scope="module")
def expected(offline):
    return [o.outputs[0].text for o in offline]


@pytest.fixture(scope="module")
def expected_reasons(offline):
    return [o.outputs[0].finish_reason for o in offline]


def _texts(arr) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]


def _http_inputs(binary: bool):
    inp = httpclient.InferInput("text_input", [len(PROMPTS)], "BYTES")
    inp.set_data_from_numpy(np.array(PROMPTS, dtype=np.object_), binary_data=binary)
    return [inp]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_http_batch_matches_offline(server, expected, binary):
    client = httpclient.InferenceServerClient(server.http_addr)
    # JSON mode sends no inference-header-content-length: KServe then parses the body only as JSON
    headers = None if binary else {"Content-Type": "application/json"}
    res = client.infer(server.model, _http_inputs(binary), request_id="v2-http-1", headers=headers,
                       outputs=[httpclient.InferRequestedOutput("text_output", binary_data=binary)],
                       parameters={"max_tokens": MAX_TOKENS, "temperature": 0})
    assert _texts(res.as_numpy("text_output")) == expected
    assert res.get_response()["id"] == "v2-http-1"
    assert all(expected) and len(set(expected)) == len(expected), f"weak reference texts: {expected}"


def test_grpc_batch_matches_offline(server, expected, expected_reasons):
    client = grpcclient.InferenceServerClient(server.grpc_addr)
    inp = grpcclient.InferInput("text_input", [len(PROMPTS)], "BYTES")
    inp.set_data_from_numpy(np.array(PROMPTS, dtype=np.object_))
    # a float parameter travels as Triton's double_param, which KServe's proto does not know
    res = client.infer(server.model, [inp], request_id="v2-grpc-1",
                       parameters={"max_tokens": MAX_TOKENS, "temperature": 0.0})
    assert _texts(res.as_numpy("text_output")) == expected
    assert _texts(res.as_numpy("finish_reason")) == expected_reasons
    assert res.get_response().id == "v2-grpc-1"


def test_grpc_per_prompt_input_tensors(server, llm):
    """Sampling inputs as tensors: one value per prompt, and the float temperature parameter applies."""
    max_tokens = np.array([2, 5, 9], dtype=np.int32)
    client = grpcclient.InferenceServerClient(server.grpc_addr)
    text = grpcclient.InferInput("text_input", [3], "BYTES")
    text.set_data_from_numpy(np.array(PROMPTS, dtype=np.object_))
    mt = grpcclient.InferInput("max_tokens", [3], "INT32")
    mt.set_data_from_numpy(max_tokens)
    res = client.infer(server.model, [text, mt], parameters={"temperature": 0.0, "ignore_eos": True})
    want = llm.generate(PROMPTS, [SamplingParams(max_tokens=int(m), temperature=0, ignore_eos=True)
                                  for m in max_tokens])
    assert _texts(res.as_numpy("text_output")) == [o.outputs[0].text for o in want]
    # and the seeded sampling path: same seed, same text; the float temperature really arrived
    seeded = [client.infer(server.model, [text], parameters={"temperature": 1.5, "seed": 7, "max_tokens": 12})
              for _ in range(2)]
    a, b = (_texts(r.as_numpy("text_output")) for r in seeded)
    assert a == b
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0))
    assert a != [o.outputs[0].text for o in greedy], "temperature 1.5 gave the greedy texts: was it dropped?"


def test_metadata(server):
    meta = httpclient.InferenceServerClient(server.http_addr).get_model_metadata(server.model)
    inputs = {t["name"]: t for t in meta["inputs"]}
    assert inputs["text_input"]["datatype"] == "BYTES"
    assert {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop"} <= set(inputs)
    assert {t["name"]: t["datatype"] for t in meta["outputs"]}["text_output"] == "BYTES"
    gmeta = grpcclient.InferenceServerClient(server.grpc_addr).get_model_metadata(server.model)
    assert [(t.name, t.datatype) for t in gmeta.inputs][0] == ("text_input", "BYTES")
    assert ("text_output", "BYTES") in [(t.name, t.datatype) for t in gmeta.outputs]


def _rest(server, body, model=None, **kw):
    return httpx.post(f"{server.url}/v2/models/{model or server.model}/infer", timeout=30,
                      headers={"Content-Type": "application/json"}, **({"json": body} if body is not None else kw))


def _text_input(*prompts, datatype="BYTES"):
    return {"name": "text_input", "shape": [len(prompts)], "datatype": datatype, "data": list(prompts)}


LONG_PROMPT = "word " * 600  # > max_model_len 512 tokens


@pytest.mark.parametrize("body, status, words", [
    ({"inputs": [_text_input(1.0, datatype="FP32")]}, 400, ["text_input", "BYTES", "FP32"]),
    ({"inputs": [{"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [4]}]}, 400,
     ["missing", "text_input"]),
    ({"inputs": [_text_input("hi")], "parameters": {"max_tokens": -1}}, 400, ["max_tokens", "-1"]),
    ({"inputs": [_text_input("hi")], "parameters": {"max_token": 3}}, 400, ["unknown", "max_token"]),
    ({"inputs": [_text_input("hi"), {"name": "colour", "shape": [1], "datatype": "BYTES", "data": ["red"]}]},
     400, ["unexpected input", "colour"]),
    ({"inputs": [_text_input(LONG_PROMPT)]}, 400, ["prompt", "max_model_len"]),
    ({"inputs": [{"name": "text_input", "shape": [3], "datatype": "BYTES", "data": ["a"]}]}, 400,
     ["text_input", "shape"]),
], ids=["wrong-datatype", "missing-text_input", "negative-max_tokens", "unknown-parameter", "unknown-input",
        "prompt-too-long", "shape-mismatch"])
def test_rest_malformed(server, body, status, words):
    r = _rest(server, body)
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert all(w in message for w in words), message


def test_rest_bad_json_and_unknown_model(server):
    r = _rest(server, None, content=b'{"inputs": [')
    assert r.status_code == 400 and "JSON" in r.json()["error"], r.text
    r = _rest(server, {"inputs": [_text_input("hi")]}, model="no-such-model")
    assert r.status_code == 404 and "no-such-model" in r.json()["error"], r.text


def _grpc_error(server, inputs, model=None, parameters=None) -> InferenceServerException:
    client = grpcclient.InferenceServerClient(server.grpc_addr)
    with pytest.raises(InferenceServerException) as err:
        client.infer(model or server.model, inputs, parameters=parameters)
    return err.value


def _grpc_input(name, values, datatype):
    inp = grpcclient.InferInput(name, [len(values)], datatype)
    inp.set_data_from_numpy(np.array(values, dtype=np.object_ if datatype == "BYTES" else np.int32))
    return inp


@pytest.mark.parametrize("case", ["wrong-datatype", "missing-text_input", "negative-max_tokens", "prompt-too-long",
                                  "unknown-model"])
def test_grpc_malformed(server, case):
    hi = _grpc_input("text_input", ["hi"], "BYTES")
    err = {
        "wrong-datatype": lambda: _grpc_error(server, [_grpc_input("text_input", [1], "INT32")]),
        "missing-text_input": lambda: _grpc_error(server, [_grpc_input("max_tokens", [4], "INT32")]),
        "negative-max_tokens": lambda: _grpc_error(server, [hi], parameters={"max_tokens": -1}),
        "prompt-too-long": lambda: _grpc_error(server, [_grpc_input("text_input", [LONG_PROMPT], "BYTES")]),
        "unknown-model": lambda: _grpc_error(server, [hi], model="no-such-model"),
    }[case]()
    status, words = {
        "wrong-datatype": ("INVALID_ARGUMENT", ["text_input", "BYTES"]),
        "missing-text_input": ("INVALID_ARGUMENT", ["text_input"]),
        "negative-max_tokens": ("INVALID_ARGUMENT", ["max_tokens"]),
        "prompt-too-long": ("INVALID_ARGUMENT", ["max_model_len"]),
        "unknown-model": ("NOT_FOUND", ["no-such-model"]),
    }[case]
    assert err.status() == f"StatusCode.{status}", (err.status(), err.message())
    assert all(w in err.message() for w in words), err.message()


def test_still_serving_after_errors(server, expected):
    """Runs last in this module: every malformed request above left the server able to answer."""
    server.assert_alive()
    client = grpcclient.InferenceServerClient(server.grpc_addr)
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array(PROMPTS[:1], dtype=np.object_))
    res = client.infer(server.model, [inp], parameters={"max_tokens": MAX_TOKENS, "temperature": 0.0})
    assert _texts(res.as_numpy("text_output")) == expected[:1]
    server.assert_idle(timeout=0)
