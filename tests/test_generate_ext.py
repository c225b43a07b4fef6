"""Triton's generate extension against the real server: /generate answers the offline LLM's text, and
/generate_stream delivers it incrementally, event by event, adding up to the same text."""
import json
import time

import httpx
import pytest

from kvserve.runtime.sampling_params import SamplingParams

PROMPT = "The lighthouse keeper"


def _post(server, route, body, **kw):
    return httpx.post(f"{server.url}/v2/models/{server.model}/{route}", json=body, timeout=60, **kw)


def _events(server, body):
    """(arrival time, event) of each SSE event."""
    events = []
    with httpx.stream("POST", f"{server.url}/v2/models/{server.model}/generate_stream", json=body,
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: "), line
                events.append((time.monotonic(), json.loads(line[len("data: "):])))
    return events


def test_generate_matches_offline(server, llm):
    want = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0))[0]
    # sampling fields at the top level win over "parameters" (Triton maps top-level keys to input tensors)
    r = _post(server, "generate", {"text_input": PROMPT, "max_tokens": 12,
                                   "parameters": {"temperature": 0, "max_tokens": 3}},
              headers={"X-Request-Id": "gen-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text_output"] == want.outputs[0].text
    assert body["model_name"] == server.model and body["id"] == "gen-1"
    assert r.headers["x-request-id"] == "gen-1"
    assert body["finish_reason"] == want.outputs[0].finish_reason
    assert body["usage"] == {"prompt_tokens": len(want.prompt_token_ids),
                             "completion_tokens": len(want.outputs[0].token_ids)}


def test_first_event_arrives_while_generation_runs(server):
    """Evidence that can fail: a server that buffered the answer would send the first event only after the
    request finished, when the engine no longer runs it and has generated all its tokens."""
    n = 400
    before = server.stats()
    body = {"text_input": PROMPT, "parameters": {"max_tokens": n, "temperature": 0, "ignore_eos": True}}
    with httpx.stream("POST", f"{server.url}/v2/models/{server.model}/generate_stream", json=body,
                      timeout=60) as r:
        lines = r.iter_lines()  # held: closing this iterator would hang up, and the server would abort
        first = next(line for line in lines if line)
        at_first = server.stats()
    assert json.loads(first[len("data: "):])["text_output"]
    assert at_first["num_running"] == 1, at_first
    assert at_first["generation_tokens"] - before["generation_tokens"] < n, (before, at_first)


def test_stream_adds_up_to_the_plain_answer(server):
    n = 48
    params = {"max_tokens": n, "temperature": 0, "ignore_eos": True}
    events = _events(server, {"text_input": PROMPT, "parameters": params})
    assert len(events) > 2 and events[-1][0] > events[0][0], events
    final = events[-1][1]
    assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == n
    assert all(e["finish_reason"] is None for _, e in events[:-1])
    streamed = "".join(e["text_output"] for _, e in events)
    whole = _post(server, "generate", {"text_input": PROMPT, "parameters": params}).json()
    assert streamed == whole["text_output"]


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
@pytest.mark.parametrize("body, words", [
    ({"parameters": {"max_tokens": 4}}, ["text_input"]),
    ({"text_input": PROMPT, "parameters": {"max_tokens": -1}}, ["max_tokens", "-1"]),
    ({"text_input": PROMPT, "max_tokens": "many"}, ["max_tokens"]),
    ({"text_input": PROMPT, "parameters": {"max_token": 4}}, ["max_token"]),
    ({"text_input": "word " * 600}, ["prompt", "max_model_len"]),
    ({"text_input": PROMPT, "temperature": -1}, ["temperature"]),
], ids=["missing-text_input", "negative-max_tokens", "wrong-type", "unknown-parameter", "prompt-too-long",
        "negative-temperature"])
def test_malformed(server, route, body, words):
    r = _post(server, route, body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")  # not a stream that starts, then fails
    message = r.json()["error"]
    assert all(w in message for w in words), message


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_bad_json_and_unknown_model(server, route):
    r = httpx.post(f"{server.url}/v2/models/{server.model}/{route}", content=b'{"text_input": ',
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"], r.text
    r = httpx.post(f"{server.url}/v2/models/no-such-model/{route}", json={"text_input": PROMPT}, timeout=30)
    assert r.status_code == 404 and "no-such-model" in r.json()["error"], r.text


def test_still_serving_after_errors(server):
    server.assert_alive()
    r = _post(server, "generate", {"text_input": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    server.assert_idle(timeout=0)
