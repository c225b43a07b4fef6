"""schemathesis against the live server's OpenAPI schema (`/openapi.json`), for the OpenAI and generate routes:
generated requests, valid and invalid, never get a 5xx, responses conform where the schema declares them, and
the server still answers afterwards.

Examples are bounded and derandomized (CI sees the same ones every run). Sizes that only cost time (max_tokens,
n, logprobs) are capped so the tiny model stays quick, and the model names in paths and bodies are the served
one, so that requests reach the engine instead of stopping at 404. schemathesis's pytest loader does not run
under this pytest, so the schema is loaded with `schemathesis.openapi.from_url` and each operation's strategy
drives a hypothesis test.
"""
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
              ("POST", "/v2/models/{model_name}/generate"), ("POST", "/v2/models/{model_name}/generate_stream"),
              ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}")]
EXAMPLES = 150  # per POST operation, valid and invalid ones
CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "min_tokens": 4, "n": 2, "top_logprobs": 2, "logprobs": 2}


@pytest.fixture(scope="module")
def api(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def _cap(body, model: str) -> None:
    if not isinstance(body, dict):
        return
    for key, cap in CAPS.items():
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[key] = cap
    if "model" in body:
        body["model"] = model
    _cap(body.get("parameters"), model)


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_server_errors(api, server, method, path):
    operation = api[path][method]
    names = {k: server.model for k in ("model_name", "model_id") if f"{{{k}}}" in path} or None
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if method == "POST" else [])
    strategy = st.one_of(*[operation.as_strategy(mode, path_parameters=names) for mode in modes])
    seen = {}

    @given(case=strategy)
    @settings(max_examples=EXAMPLES if method == "POST" else 5, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        _cap(case.body, server.model)
        response = case.call(timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    run()
    print(f"{method} {path}: statuses {seen}")
    if method == "POST":  # the generated cases reached the engine, and were refused too
        assert seen.get(200) and any(400 <= s < 500 for s in seen), seen


def test_still_serving_after_fuzzing(server):
    """Runs after the generated cases: the server lives, answers, and holds no request or block."""
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    server.assert_alive()
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Still here", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    server.assert_idle(timeout=0)
