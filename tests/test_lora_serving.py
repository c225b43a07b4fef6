"""LoRA adapters through every front door of a real server: OpenAI `model`, v2 (URL name and `lora`
parameter, REST and gRPC), generate, and loading / unloading at run time — each answer equal to the offline
engine's with the same adapter."""
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from kvserve.runtime.llm import LLM
from kvserve.runtime.sampling_params import SamplingParams
from server import ENGINE, MODEL_DIR, engine_flags, start_server
from tiny_models import make_adapter

PROMPT = "The lighthouse keeper"
N = 8


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return root, {name: make_adapter(str(MODEL_DIR), root / name, r=8, seed=seed)
                  for seed, name in enumerate(["sql", "poem"], start=1)}


@pytest.fixture(scope="module")
def lora_server(adapters):
    root, paths = adapters
    s = start_server(["--model_dir", str(MODEL_DIR), *engine_flags(max_loras=2, max_lora_rank=8),
                      "--lora-allowed-roots", str(root), "--lora-modules", f"sql={paths['sql']}"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def expected(adapters):
    root, paths = adapters
    llm = LLM(str(MODEL_DIR), **ENGINE, max_loras=2, max_lora_rank=8, lora_modules=paths,
              lora_allowed_roots=[str(root)])
    greedy = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    texts = {lora: llm.generate(PROMPT, greedy, lora_request=lora)[0].outputs[0].text for lora in (None, "sql", "poem")}
    assert len(set(texts.values())) == 3, f"the adapters must change the output: {texts}"
    return texts


def _openai(server, model):
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   json={"model": model, "prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": True})
    return r


def test_adapter_by_name_on_every_protocol(lora_server, expected):
    s = lora_server
    assert _openai(s, "sql").json()["choices"][0]["text"] == expected["sql"]
    assert _openai(s, s.model).json()["choices"][0]["text"] == expected[None]
    models = httpx.get(f"{s.url}/v1/models").json()["data"]
    assert {m["id"]: m["parent"] for m in models} == {s.model: None, "sql": s.model}
    # generate: by URL name and by parameter
    body = {"text_input": PROMPT, "parameters": {"max_tokens": N, "temperature": 0, "ignore_eos": True}}
    assert httpx.post(f"{s.url}/v2/models/sql/generate", json=body).json()["text_output"] == expected["sql"]
    with_param = {**body, "parameters": {**body["parameters"], "lora": "sql"}}
    assert httpx.post(f"{s.url}/v2/models/{s.model}/generate", json=with_param).json()["text_output"] == expected["sql"]
    # v2 infer: the adapter is a model of its own (REST and gRPC), or a request parameter
    http = httpclient.InferenceServerClient(s.http_addr)
    inp = httpclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([PROMPT], dtype=np.object_))
    params = {"max_tokens": N, "temperature": 0, "ignore_eos": True}
    assert http.is_model_ready("sql")
    out = http.infer("sql", [inp], parameters=params).as_numpy("text_output")[0].decode()
    assert out == expected["sql"]
    out = http.infer(s.model, [inp], parameters={**params, "lora": "sql"}).as_numpy("text_output")[0].decode()
    assert out == expected["sql"]
    grpc = grpcclient.InferenceServerClient(s.grpc_addr)
    ginp = grpcclient.InferInput("text_input", [1], "BYTES")
    ginp.set_data_from_numpy(np.array([PROMPT], dtype=np.object_))
    out = grpc.infer("sql", [ginp], parameters={"max_tokens": N, "ignore_eos": True, "temperature": 0.0})
    assert out.as_numpy("text_output")[0].decode() == expected["sql"]


def test_load_and_unload_at_run_time(lora_server, expected, adapters):
    s, (_, paths) = lora_server, adapters
    assert _openai(s, "poem").status_code == 404
    r = httpx.post(f"{s.url}/v1/load_lora_adapter", json={"lora_name": "poem", "lora_path": paths["poem"]})
    assert r.status_code == 200, r.text
    assert _openai(s, "poem").json()["choices"][0]["text"] == expected["poem"]
    r = httpx.post(f"{s.url}/v2/repository/models/poem/unload")
    assert r.status_code == 200, r.text
    assert _openai(s, "poem").status_code == 404
    assert httpx.get(f"{s.url}/v2/models/poem/ready").status_code != 200
    # the repository route loads it again, by path
    r = httpx.post(f"{s.url}/v2/repository/models/poem/load", json={"parameters": {"path": paths["poem"]}})
    assert r.status_code == 200, r.text
    assert httpx.get(f"{s.url}/v2/models/poem/ready").status_code == 200
    assert _openai(s, "poem").json()["choices"][0]["text"] == expected["poem"]
    assert httpx.post(f"{s.url}/v1/unload_lora_adapter", json={"lora_name": "poem"}).status_code == 200
    assert httpx.post(f"{s.url}/v1/unload_lora_adapter", json={"lora_name": "poem"}).status_code == 404
    s.assert_alive()


def test_adapters_that_do_not_fit_are_refused(lora_server, adapters, tmp_path):
    s, (root, _) = lora_server, adapters
    big = make_adapter(str(MODEL_DIR), root / "big", r=16, seed=9)  # rank 16 > --max-lora-rank 8
    r = httpx.post(f"{s.url}/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": big})
    assert r.status_code == 400 and "rank 16" in r.json()["error"]["message"]
    outside = make_adapter(str(MODEL_DIR), tmp_path / "outside", r=8, seed=3)
    r = httpx.post(f"{s.url}/v1/load_lora_adapter", json={"lora_name": "outside", "lora_path": outside})
    assert r.status_code == 400 and "allowed" in r.json()["error"]["message"]
    r = httpx.post(f"{s.url}/v2/repository/models/nothing/load")
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]
    r = httpx.post(f"{s.url}/v2/models/{s.model}/generate",
                   json={"text_input": PROMPT, "parameters": {"lora": "nope", "max_tokens": 2}})
    assert r.status_code == 400 and "nope" in r.text
    s.assert_alive()
