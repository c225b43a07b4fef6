"""EngineMetrics: synthetic StepStats in, prometheus_client's own text rendering and parser out."""
import itertools
import time

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvserve.adapters.metrics import (FINISH_REASONS, ITL_BUCKETS, MAX_CLOCKS, REQUEST_LATENCY_BUCKETS,
                                      STALE_CLOCK_SECONDS, TTFT_BUCKETS, EngineMetrics)
from kvserve.runtime.stats import EngineStats, RequestEvent, StepStats

_ids = itertools.count()


def fresh_name() -> str:
    # the registry is process-wide: each test owns its own model_name
    return f"test-model-{next(_ids)}"


def scrape(model: str) -> dict[tuple, float]:
    """{(sample name, sorted labels without model_name): value} for one model, parsed from the text format."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for s in family.samples:
            if s.labels.get("model_name") == model and not s.name.endswith("_created"):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[(s.name, labels)] = s.value
    return out


def ev(rid, *, prompt=4, new=1, first=False, finished=False, reason=None, arrival=100.0, scheduled=None,
       first_token=None, now, generated=0, lora=None):
    return RequestEvent(request_id=rid, num_prompt_tokens=prompt, num_new_tokens=new, first_token=first,
                        finished=finished, finish_reason=reason, arrival_time=arrival,
                        first_scheduled_time=scheduled, first_token_time=first_token, now=now,
                        num_generation_tokens=generated, lora=lora)


def bucket(m, name, le):
    return m[(f"{name}_bucket", (("le", le),))]


def test_gauges_follow_the_latest_step():
    name = fresh_name()
    metrics = EngineMetrics(name)
    metrics(StepStats(EngineStats(num_running=3, num_waiting=7, kv_cache_usage=0.625)))
    m = scrape(name)
    assert m[("vllm:num_requests_running", ())] == 3
    assert m[("vllm:num_requests_waiting", ())] == 7
    assert m[("vllm:kv_cache_usage_perc", ())] == 0.625
    metrics(StepStats(EngineStats(num_running=1, num_waiting=0, kv_cache_usage=0.0)))
    m = scrape(name)
    assert (m[("vllm:num_requests_running", ())], m[("vllm:num_requests_waiting", ())]) == (1, 0)
    assert m[("vllm:kv_cache_usage_perc", ())] == 0.0


def test_counters_take_deltas_of_the_cumulative_stats():
    name = fresh_name()
    metrics = EngineMetrics(name)
    metrics(StepStats(EngineStats(prompt_tokens=10, generation_tokens=2, prefix_cache_queries=10,
                                  prefix_cache_hits=0, num_preemptions=0)))
    metrics(StepStats(EngineStats(prompt_tokens=10, generation_tokens=5, prefix_cache_queries=26,
                                  prefix_cache_hits=16, num_preemptions=1)))
    metrics(StepStats(EngineStats(prompt_tokens=42, generation_tokens=9, prefix_cache_queries=58,
                                  prefix_cache_hits=48, num_preemptions=3)))
    m = scrape(name)
    assert m[("vllm:prompt_tokens_total", ())] == 42
    assert m[("vllm:generation_tokens_total", ())] == 9
    assert m[("vllm:prefix_cache_queries_total", ())] == 58
    assert m[("vllm:prefix_cache_hits_total", ())] == 48
    assert m[("vllm:num_preemptions_total", ())] == 3
    # a restarted engine counts from zero again: the counter keeps rising instead of going back
    metrics(StepStats(EngineStats(prompt_tokens=5)))
    assert scrape(name)[("vllm:prompt_tokens_total", ())] == 47


def test_request_lifecycle_feeds_histograms_and_finish_reasons():
    name = fresh_name()
    metrics = EngineMetrics(name)
    idle = EngineStats()
    # r1: queued 0.5 s, first token at 101.0 (TTFT 1.0), tokens at 101.25 and 101.5, stops: e2e 1.5
    # r2: queued 0.2 s, first token at 100.5 (TTFT 0.5), one more token at 100.55, hits max_tokens: e2e 0.55
    # r3: aborted at 103.0 while still waiting (never scheduled): queue time = e2e = 3.0, no TTFT
    metrics(StepStats(idle, [ev("r2", first=True, scheduled=100.2, first_token=100.5, now=100.5, generated=1)]))
    metrics(StepStats(idle, [ev("r2", finished=True, reason="length", scheduled=100.2, now=100.55, generated=2,
                                prompt=30)]))
    metrics(StepStats(idle, [ev("r1", first=True, scheduled=100.5, first_token=101.0, now=101.0, generated=1)]))
    metrics(StepStats(idle, [ev("r1", scheduled=100.5, now=101.25, generated=2),
                             ev("r4", new=0, now=101.25)]))  # r4: no token this step, no clock: ignored
    metrics(StepStats(idle, [ev("r1", new=2, finished=True, reason="stop", scheduled=100.5, now=101.5,
                                generated=4, prompt=4)]))
    metrics(StepStats(idle, [ev("r3", new=0, finished=True, reason="abort", now=103.0, prompt=7)]))
    m = scrape(name)

    assert m[("vllm:time_to_first_token_seconds_count", ())] == 2
    assert m[("vllm:time_to_first_token_seconds_sum", ())] == pytest.approx(1.5)
    assert bucket(m, "vllm:time_to_first_token_seconds", "0.5") == 1
    assert bucket(m, "vllm:time_to_first_token_seconds", "1.0") == 2

    # r2: 0.05; r1: 0.25, 0.25 (one observation per step even when the step made two tokens)
    assert m[("vllm:inter_token_latency_seconds_count", ())] == 3
    assert m[("vllm:inter_token_latency_seconds_sum", ())] == pytest.approx(0.55)
    assert bucket(m, "vllm:inter_token_latency_seconds", "0.05") == 1
    assert bucket(m, "vllm:inter_token_latency_seconds", "0.2") == 1
    assert bucket(m, "vllm:inter_token_latency_seconds", "0.3") == 3

    assert m[("vllm:e2e_request_latency_seconds_count", ())] == 3
    assert m[("vllm:e2e_request_latency_seconds_sum", ())] == pytest.approx(1.5 + 0.55 + 3.0)
    assert bucket(m, "vllm:e2e_request_latency_seconds", "0.8") == 1
    assert bucket(m, "vllm:e2e_request_latency_seconds", "1.5") == 2
    assert bucket(m, "vllm:e2e_request_latency_seconds", "2.5") == 2
    assert bucket(m, "vllm:e2e_request_latency_seconds", "5.0") == 3

    assert m[("vllm:request_queue_time_seconds_count", ())] == 3
    assert m[("vllm:request_queue_time_seconds_sum", ())] == pytest.approx(0.5 + 0.2 + 3.0)
    assert bucket(m, "vllm:request_queue_time_seconds", "0.3") == 1
    assert bucket(m, "vllm:request_queue_time_seconds", "0.5") == 2

    assert m[("vllm:request_prompt_tokens_count", ())] == 3
    assert m[("vllm:request_prompt_tokens_sum", ())] == 4 + 30 + 7
    assert bucket(m, "vllm:request_prompt_tokens", "5.0") == 1
    assert bucket(m, "vllm:request_prompt_tokens", "10.0") == 2
    assert bucket(m, "vllm:request_prompt_tokens", "50.0") == 3
    assert m[("vllm:request_generation_tokens_count", ())] == 3
    assert m[("vllm:request_generation_tokens_sum", ())] == 4 + 2 + 0
    assert bucket(m, "vllm:request_generation_tokens", "1.0") == 1

    success = {labels[0][1]: v for (n, labels), v in m.items() if n == "vllm:request_success_total"}
    assert success == {"stop": 1.0, "length": 1.0, "abort": 1.0}
    assert metrics._last_token_time == {}  # finished requests leave no clock behind


def test_every_finish_reason_is_exported_from_zero():
    name = fresh_name()
    EngineMetrics(name)
    m = scrape(name)
    assert {labels: v for (n, labels), v in m.items() if n == "vllm:request_success_total"} == {
        (("finished_reason", r),): 0.0 for r in FINISH_REASONS}


def test_exported_names_and_buckets_match_vllm():
    name = fresh_name()
    EngineMetrics(name, max_loras=2)(StepStats(EngineStats(), []))
    text = generate_latest(REGISTRY).decode()
    for exported in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                     "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                     "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                     "vllm:request_success_total", "vllm:request_prompt_tokens_bucket",
                     "vllm:request_generation_tokens_bucket", "vllm:time_to_first_token_seconds_bucket",
                     "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
                     "vllm:request_queue_time_seconds_bucket", "vllm:lora_requests_info"]:
        assert f"\n{exported}{{" in text, exported
    m = scrape(name)
    for metric, buckets in [("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
                            ("vllm:inter_token_latency_seconds", ITL_BUCKETS),
                            ("vllm:e2e_request_latency_seconds", REQUEST_LATENCY_BUCKETS),
                            ("vllm:request_queue_time_seconds", REQUEST_LATENCY_BUCKETS)]:
        les = [float(labels[0][1]) for (n, labels), _ in m.items() if n == f"{metric}_bucket"]
        assert sorted(les) == buckets + [float("inf")]
    # vLLM's published boundaries, spelled out so a change to the constants is caught
    assert TTFT_BUCKETS[:3] == [0.001, 0.005, 0.01] and TTFT_BUCKETS[-1] == 2560.0 and len(TTFT_BUCKETS) == 22
    assert ITL_BUCKETS[0] == 0.01 and ITL_BUCKETS[-1] == 80.0 and len(ITL_BUCKETS) == 19
    assert REQUEST_LATENCY_BUCKETS[0] == 0.3 and REQUEST_LATENCY_BUCKETS[-1] == 7680.0
    assert len(REQUEST_LATENCY_BUCKETS) == 21


def test_lora_info_keeps_one_current_series():
    name = fresh_name()
    metrics = EngineMetrics(name, max_loras=4)
    before = time.time()
    metrics(StepStats(EngineStats(running_loras=["sql", "chat"], waiting_loras=["poem"])))
    m = scrape(name)
    lora = {labels: v for (n, labels), v in m.items() if n == "vllm:lora_requests_info"}
    assert list(lora) == [(("max_lora", "4"), ("running_lora_adapters", "sql,chat"),
                           ("waiting_lora_adapters", "poem"))]
    assert before <= next(iter(lora.values())) <= time.time()
    metrics(StepStats(EngineStats(running_loras=["poem"], waiting_loras=[])))
    lora = {labels for (n, labels) in scrape(name) if n == "vllm:lora_requests_info"}
    assert lora == {(("max_lora", "4"), ("running_lora_adapters", "poem"), ("waiting_lora_adapters", ""))}


def test_no_lora_series_without_lora():
    name = fresh_name()
    EngineMetrics(name)(StepStats(EngineStats(running_loras=[])))
    assert not [k for k in scrape(name) if k[0] == "vllm:lora_requests_info"]


def test_two_models_in_one_process_are_independent():
    a, b = fresh_name(), fresh_name()
    ma, mb = EngineMetrics(a), EngineMetrics(b)  # a second instance must not re-register the metrics
    ma(StepStats(EngineStats(num_waiting=2, prompt_tokens=100)))
    mb(StepStats(EngineStats(num_waiting=5, prompt_tokens=7)))
    ma(StepStats(EngineStats(num_waiting=1, prompt_tokens=150)))
    sa, sb = scrape(a), scrape(b)
    assert (sa[("vllm:num_requests_waiting", ())], sa[("vllm:prompt_tokens_total", ())]) == (1, 150)
    assert (sb[("vllm:num_requests_waiting", ())], sb[("vllm:prompt_tokens_total", ())]) == (5, 7)


def test_close_removes_the_models_series():
    a, b = fresh_name(), fresh_name()
    ma, mb = EngineMetrics(a, max_loras=1), EngineMetrics(b)
    ma(StepStats(EngineStats(num_waiting=2, running_loras=["x"]), [ev("r", first=True, now=101.0)]))
    mb(StepStats(EngineStats(num_waiting=3)))
    assert scrape(a)
    ma.close()
    assert scrape(a) == {}
    assert scrape(b)[("vllm:num_requests_waiting", ())] == 3


def test_clocks_of_requests_that_vanished_are_dropped():
    metrics = EngineMetrics(fresh_name())
    # requests that got a first token and were never reported finished (an unreported abort)
    metrics(StepStats(EngineStats(), [ev(f"gone-{i}", first=True, now=100.0) for i in range(MAX_CLOCKS + 1)]))
    assert len(metrics._last_token_time) == MAX_CLOCKS + 1
    metrics(StepStats(EngineStats(), [ev("live", first=True, now=100.0 + STALE_CLOCK_SECONDS - 1)]))
    assert len(metrics._last_token_time) == MAX_CLOCKS + 2  # not stale yet: kept
    metrics(StepStats(EngineStats(), [ev("live", now=101.0 + STALE_CLOCK_SECONDS)]))
    assert metrics._last_token_time == {"live": 101.0 + STALE_CLOCK_SECONDS}
