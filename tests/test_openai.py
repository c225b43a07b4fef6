"""The OpenAI routes against the real server with the openai SDK (sync and async, streaming and not), under
both /openai/v1 and /v1: answers match the offline LLM, streams add up, usage counts are right."""
import asyncio

import httpx
import openai
import pytest

from kvserve.runtime.sampling_params import SamplingParams

BASES = ["/openai/v1", "/v1"]
PROMPT = "The lighthouse keeper"
MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "How often should I water tomatoes?"}]


def _client(server, base, cls=openai.OpenAI):
    return cls(base_url=f"{server.url}{base}", api_key="unused", max_retries=0, timeout=60)


def _chat_ids(llm, messages=MESSAGES) -> list[int]:
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("base", BASES)
def test_models(server, base):
    client = _client(server, base)
    assert [m.id for m in client.models.list()] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_v1_models_keeps_kserve_v1_shape(server):
    body = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert body["models"] == [server.model] and body["object"] == "list"
    body = httpx.get(f"{server.url}/v1/models/{server.model}", timeout=10).json()
    assert body["name"] == server.model and body["ready"] is True


@pytest.mark.parametrize("base", BASES)
def test_completion_matches_offline(server, llm, base):
    want = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0))[0]
    res = _client(server, base).completions.create(model=server.model, prompt=PROMPT, max_tokens=10,
                                                   temperature=0)
    assert res.choices[0].text == want.outputs[0].text
    assert res.choices[0].finish_reason == want.outputs[0].finish_reason
    assert res.usage.prompt_tokens == len(llm.get_tokenizer().encode(PROMPT)) == len(want.prompt_token_ids)
    assert res.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


@pytest.mark.parametrize("base", BASES)
def test_completion_stream_adds_up(server, base):
    client = _client(server, base)
    kw = dict(model=server.model, prompt=[PROMPT, "Kubernetes schedules"], max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    texts, usage = {}, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in whole.choices}
    assert usage == whole.usage


@pytest.mark.parametrize("base", BASES)
def test_chat_matches_offline(server, llm, base):
    ids = _chat_ids(llm)
    want = llm.generate([ids], SamplingParams(max_tokens=16, temperature=0))[0]
    res = _client(server, base).chat.completions.create(model=server.model, messages=MESSAGES,
                                                        max_completion_tokens=16, temperature=0,
                                                        extra_headers={"X-Request-Id": "chat-1"})
    assert res.id == "chatcmpl-chat-1"
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == want.outputs[0].text
    # prompt tokens = the tokenizer's count of the templated prompt
    assert res.usage.prompt_tokens == len(ids)
    assert res.usage.completion_tokens == len(want.outputs[0].token_ids)


@pytest.mark.parametrize("base", BASES)
def test_chat_stream_async_adds_up(server, base):
    async def run():
        client = _client(server, base, openai.AsyncOpenAI)
        kw = dict(model=server.model, messages=MESSAGES, max_tokens=12, temperature=0)
        whole = await client.chat.completions.create(**kw)
        stream = await client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
        chunks = [c async for c in stream]
        await client.close()
        return whole, chunks

    whole, chunks = asyncio.run(run())
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage and not chunks[-1].choices


def test_async_completion(server, llm):
    async def run():
        async with _client(server, "/v1", openai.AsyncOpenAI) as client:
            return await asyncio.gather(*[client.completions.create(model=server.model, prompt=p, max_tokens=6,
                                                                    temperature=0) for p in prompts])

    prompts = [PROMPT, "Kubernetes schedules", "To water tomatoes you"]
    got = [r.choices[0].text for r in asyncio.run(run())]
    assert got == [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0))]


def test_n2(server):
    client = _client(server, "/v1")
    res = client.completions.create(model=server.model, prompt=PROMPT, n=2, max_tokens=5, temperature=1.0,
                                    seed=1, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in res.choices) == [0, 1]
    assert res.usage.completion_tokens == 10
    chat = client.chat.completions.create(model=server.model, messages=MESSAGES, n=2, max_tokens=4,
                                          temperature=1.0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in chat.choices) == [0, 1] and chat.usage.completion_tokens == 8
    streamed = {}
    for chunk in client.chat.completions.create(model=server.model, messages=MESSAGES, n=2, max_tokens=4,
                                                temperature=1.0, stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            streamed.setdefault(c.index, []).append(c.delta)
    assert sorted(streamed) == [0, 1] and all(ds[0].role == "assistant" for ds in streamed.values())


def test_logprobs(server):
    client = _client(server, "/openai/v1")
    res = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == res.usage.completion_tokens
    assert "".join(lp.tokens) == res.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
    chat = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode() == t.token


def test_stop(server, llm):
    ref = llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0))[0].outputs[0].text
    stop = ref[len(ref) // 2:len(ref) // 2 + 2]
    assert stop.strip(), f"reference output too plain to pick a stop string: {ref!r}"
    res = _client(server, "/v1").completions.create(model=server.model, prompt=PROMPT, max_tokens=24,
                                                    temperature=0, stop=[stop])
    assert res.choices[0].text == ref[:ref.index(stop)]
    assert res.choices[0].finish_reason == "stop"


def test_seed_reproducible(server):
    client = _client(server, "/v1")

    def sample(seed):
        return client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=1.0,
                                         seed=seed).choices[0].text

    assert sample(123) == sample(123)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1, "different seeds all gave one text: seed ignored?"


def test_max_completion_tokens(server):
    client = _client(server, "/v1")
    kw = dict(model=server.model, messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True})
    assert client.chat.completions.create(max_completion_tokens=3, **kw).usage.completion_tokens == 3
    assert client.chat.completions.create(max_tokens=4, **kw).usage.completion_tokens == 4


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("route, body, param, words", [
    ("completions", {"prompt": PROMPT, "max_tokens": -1}, "max_tokens", ["max_tokens"]),
    ("completions", {"prompt": PROMPT, "max_tokens": "many"}, "max_tokens", ["max_tokens"]),
    ("completions", {"prompt": PROMPT, "bogus": 1}, "bogus", ["bogus"]),
    ("completions", {"prompt": "word " * 600}, None, ["max_model_len"]),
    ("completions", {"max_tokens": 3}, "prompt", ["prompt"]),
    ("completions", {"prompt": PROMPT, "logprobs": 99}, None, ["logprobs"]),
    ("chat/completions", {"messages": []}, "messages", ["messages"]),
    ("chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", ["logprobs"]),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", ["role"]),
    ("chat/completions", {"messages": MESSAGES, "temperature": -2}, "temperature", ["temperature"]),
], ids=["negative-max_tokens", "wrong-type", "unknown-field", "prompt-too-long", "missing-prompt",
        "too-many-logprobs", "no-messages", "top_logprobs-alone", "bad-role", "negative-temperature"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_errors_in_openai_shape(server, route, body, param, words, stream):
    r = httpx.post(f"{server.url}/v1/{route}", json={**body, "stream": stream}, timeout=30)
    err = _error(r, 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert all(w in err["message"] for w in words), err


def test_sdk_errors(server):
    client = _client(server, "/openai/v1")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "no-such-model" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=-5)
    assert "max_tokens" in e.value.body["message"]
    err = _error(httpx.post(f"{server.url}/openai/v1/completions", content=b'{"prompt": ',
                            headers={"Content-Type": "application/json"}, timeout=30), 400)
    assert "JSON" in err["message"]


def test_still_serving_after_errors(server):
    server.assert_alive()
    res = _client(server, "/v1").chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=2)
    assert res.usage.completion_tokens <= 2
    server.assert_idle(timeout=0)
