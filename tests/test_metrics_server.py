"""/metrics of a real `kvserve serve` under load, read with prometheus_client's parser: the queue shows while
requests wait for a batch slot and empties after, and counters and histograms move by exactly what a known
set of requests (sent with the OpenAI SDK) implies."""
import asyncio

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server import engine_flags, start_server

MODEL = "metrics-test"
N, MAX_TOKENS = 8, 48  # 8 requests through 2 batch slots: most of them queue
PROMPTS = [list(range(20 + 7 * i, 20 + 7 * i + 5 + i)) for i in range(N)]  # distinct, 5..12 tokens


@pytest.fixture(scope="module")
def server(tiny_model):
    s = start_server(["--model_dir", tiny_model("qwen3"), "--model_name", MODEL,
                      *engine_flags(max_num_seqs=2, max_model_len=256)])
    s.model = MODEL
    yield s
    s.stop()


def scrape(url: str) -> dict[tuple, float]:
    """{(sample name, labels other than model_name): value} for the test model."""
    out = {}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("vllm:") and s.labels.get("model_name") == MODEL:
                out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return out


async def load(url: str) -> tuple[list, list[float]]:
    """Send every prompt at once and sample /metrics' queue depth until they are all answered."""
    client = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key="unused", max_retries=0, timeout=120)
    calls = [asyncio.create_task(client.completions.create(
        model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}))
        for p in PROMPTS]
    waiting = []
    async with httpx.AsyncClient(timeout=10) as http:
        while not all(c.done() for c in calls):
            text = (await http.get(f"{url}/metrics")).text
            waiting += [s.value for f in text_string_to_metric_families(text) for s in f.samples
                        if s.name == "vllm:num_requests_waiting" and s.labels.get("model_name") == MODEL]
            await asyncio.sleep(0.02)
    return [await c for c in calls], waiting


def test_metrics_under_load(server):
    before = scrape(server.url)
    responses, waiting = asyncio.run(load(server.url))
    after = scrape(server.url)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    prompt_tokens = sum(r.usage.prompt_tokens for r in responses)
    assert prompt_tokens == sum(len(p) for p in PROMPTS)
    assert all(r.usage.completion_tokens == MAX_TOKENS and r.choices[0].finish_reason == "length"
               for r in responses)

    assert max(waiting) > 0, "requests queued behind 2 batch slots, yet vllm:num_requests_waiting never rose"
    assert after[("vllm:num_requests_waiting", ())] == 0
    assert after[("vllm:num_requests_running", ())] == 0
    assert 0 <= after[("vllm:kv_cache_usage_perc", ())] <= 1
    server.assert_idle(timeout=0)

    assert delta("vllm:request_success_total", finished_reason="length") == N
    assert delta("vllm:request_success_total", finished_reason="stop") == 0
    assert delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("vllm:generation_tokens_total") == N * MAX_TOKENS
    assert delta("vllm:num_preemptions_total") == 0  # the KV pool holds every request at once
    assert 0 <= delta("vllm:prefix_cache_hits_total") <= delta("vllm:prefix_cache_queries_total")

    for histogram in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                      "vllm:request_queue_time_seconds", "vllm:request_prompt_tokens",
                      "vllm:request_generation_tokens"):
        assert delta(f"{histogram}_count") == N, histogram
        assert delta(f"{histogram}_bucket", le="+Inf") == N, histogram
    # one inter-token gap per decode step after the first token of each request (n=1: a token per step)
    assert delta("vllm:inter_token_latency_seconds_count") == N * (MAX_TOKENS - 1)
    assert delta("vllm:request_prompt_tokens_sum") == prompt_tokens
    assert delta("vllm:request_generation_tokens_sum") == N * MAX_TOKENS
    # the requests that queued spent time there, and no request's queue time exceeds its whole life
    assert 0 < delta("vllm:request_queue_time_seconds_sum") < delta("vllm:e2e_request_latency_seconds_sum")
    assert delta("vllm:time_to_first_token_seconds_sum") < delta("vllm:e2e_request_latency_seconds_sum")
