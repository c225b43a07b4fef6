"""vLLM-compatible Prometheus series, fed by the engine's per-step StepStats.

Names, label names, help texts and bucket boundaries follow vLLM's PrometheusStatLogger, because routers,
dashboards and the Gateway API inference extension key on them. prometheus_client appends `_total` to counter
names, so `vllm:prompt_tokens` is exported as `vllm:prompt_tokens_total`, exactly as vLLM exports it.

The metric objects live at module level in prometheus_client's default REGISTRY (the one KServe's /metrics
serves): registering a name twice raises, so every EngineMetrics shares them and owns only its `model_name`
children. Unlike vLLM there is no `engine` label: one engine serves one model here.
"""
import time

from prometheus_client import Counter, Gauge, Histogram

from kvserve.runtime.stats import EngineStats, StepStats

_L = ["model_name"]
FINISH_REASONS = ("stop", "length", "abort")

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
# vLLM ends its 1-2-5 token buckets at max_model_len; metrics shared by every model in the process need one
# fixed set, so it runs to 1M tokens (longer than any context served here).
TOKEN_BUCKETS = [m * 10**e for e in range(6) for m in (1, 2, 5)] + [1_000_000]

# Not a vLLM series: requests the server turned away or cut off, so that refusals show beside the queue depth.
REJECTED_REASONS = ("overloaded", "unavailable", "deadline")
REJECTED = Counter("kvserve:requests_rejected",
                   "Requests refused or cut off by the server: overloaded (the waiting queue is full: 429/503, "
                   "RESOURCE_EXHAUSTED), unavailable (shutting down or the engine died: 503), deadline (the "
                   "request's timeout passed: 504, DEADLINE_EXCEEDED).", _L + ["reason"])
RUNNING = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", _L)
WAITING = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", _L)
KV_USAGE = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", _L)
PREFIX_QUERIES = Counter("vllm:prefix_cache_queries",
                         "Prefix cache queries, in terms of number of queried tokens.", _L)
PREFIX_HITS = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", _L)
PREEMPTIONS = Counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", _L)
PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", _L)
GENERATION_TOKENS = Counter("vllm:generation_tokens", "Number of generation tokens processed.", _L)
SUCCESS = Counter("vllm:request_success", "Count of successfully processed requests.", _L + ["finished_reason"])
REQUEST_PROMPT_TOKENS = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", _L,
                                  buckets=TOKEN_BUCKETS)
REQUEST_GENERATION_TOKENS = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                      _L, buckets=TOKEN_BUCKETS)
TTFT = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", _L,
                 buckets=TTFT_BUCKETS)
ITL = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _L,
                buckets=ITL_BUCKETS)
E2E = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", _L,
                buckets=REQUEST_LATENCY_BUCKETS)
QUEUE_TIME = Histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                       _L, buckets=REQUEST_LATENCY_BUCKETS)
# vLLM's info-style gauge: the value is the time of the last update, the adapters sit in the labels.
LORA_INFO = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                  _L + ["max_lora", "waiting_lora_adapters", "running_lora_adapters"])

# KV offload (runtime/kv_offload.py): kvserve's own series, vLLM has no equivalent. Exported once there is
# something to count; the per-tier ones carry a `tier` label: cpu, disk or remote.
_T = _L + ["tier"]
OFFLOAD_HITS = Counter("kvserve:kv_offload_hits", "KV chunks restored from an offload tier.", _T)
OFFLOAD_MISSES = Counter("kvserve:kv_offload_misses", "KV chunk lookups at admission found in no offload tier.", _L)
OFFLOAD_RECOMPUTED = Counter("kvserve:kv_offload_recomputed_chunks",
                             "KV chunks held by an offload tier but recomputed, as that was estimated faster.", _L)
OFFLOAD_SAVED = Counter("kvserve:kv_offload_saved_chunks", "KV chunks saved to an offload tier.", _T)
OFFLOAD_DROPPED = Counter("kvserve:kv_offload_dropped_saves",
                          "KV chunk saves dropped because the offload writer was behind.", _L)
OFFLOAD_LOADED_BYTES = Counter("kvserve:kv_offload_loaded_bytes", "Bytes of KV loaded from an offload tier.", _T)
OFFLOAD_SAVED_BYTES = Counter("kvserve:kv_offload_saved_bytes", "Bytes of KV saved to an offload tier.", _T)
OFFLOAD_RESTORED_TOKENS = Counter("kvserve:kv_offload_restored_tokens",
                                  "Tokens whose KV was restored from an offload tier instead of computed.", _L)
# EngineStats field -> counter: plain counts, and per-tier dicts
_OFFLOAD = {"kv_offload_misses": OFFLOAD_MISSES, "kv_offload_recomputed": OFFLOAD_RECOMPUTED,
            "kv_offload_saves_dropped": OFFLOAD_DROPPED, "kv_offload_tokens_restored": OFFLOAD_RESTORED_TOKENS,
            "kv_offload_hits": OFFLOAD_HITS, "kv_offload_chunks_saved": OFFLOAD_SAVED,
            "kv_offload_bytes_loaded": OFFLOAD_LOADED_BYTES, "kv_offload_bytes_saved": OFFLOAD_SAVED_BYTES}

# EngineStats cumulative field -> counter it feeds
_COUNTED = {"prefix_cache_queries": PREFIX_QUERIES, "prefix_cache_hits": PREFIX_HITS,
            "num_preemptions": PREEMPTIONS, "prompt_tokens": PROMPT_TOKENS,
            "generation_tokens": GENERATION_TOKENS}
# A request that stopped getting tokens this long ago left without a finished event (an abort the engine did
# not report); its inter-token clock is dropped once clocks pile up, so memory stays bounded.
STALE_CLOCK_SECONDS = 600.0
MAX_CLOCKS = 4096

_PER_MODEL = [RUNNING, WAITING, KV_USAGE, *_COUNTED.values(), REQUEST_PROMPT_TOKENS, REQUEST_GENERATION_TOKENS,
              TTFT, ITL, E2E, QUEUE_TIME]


class EngineMetrics:
    """A stat logger for AsyncEngine: `AsyncEngine(config, stat_loggers=[EngineMetrics(name, max_loras)])`.

    Called from the engine thread once per step. Contract with the engine: every request gets a `finished`
    event when it ends, aborts included (finish_reason "abort"); that counts it and drops its inter-token
    clock."""

    def __init__(self, model_name: str, max_loras: int = 0):
        self.model_name = model_name
        self.max_loras = max_loras  # vLLM exports vllm:lora_requests_info only when LoRA is enabled
        self._seen: dict = {}  # counter field (or (field, tier)) -> cumulative value already added
        self._last_token_time: dict[str, float] = {}
        self._lora_labels: tuple[str, ...] | None = None
        # Bound children: labels() on every step would hash label tuples on the engine's hot path.
        self._running, self._waiting, self._kv = (g.labels(model_name) for g in (RUNNING, WAITING, KV_USAGE))
        self._counters = {name: c.labels(model_name) for name, c in _COUNTED.items()}
        self._success = {r: SUCCESS.labels(model_name, r) for r in FINISH_REASONS}  # exported from 0, as vLLM
        for reason in REJECTED_REASONS:
            REJECTED.labels(model_name, reason)  # exported from 0 too; the predictor counts them
        self._prompt_hist = REQUEST_PROMPT_TOKENS.labels(model_name)
        self._gen_hist = REQUEST_GENERATION_TOKENS.labels(model_name)
        self._ttft, self._itl = TTFT.labels(model_name), ITL.labels(model_name)
        self._e2e, self._queue = E2E.labels(model_name), QUEUE_TIME.labels(model_name)
        self._offload_children: dict[tuple[str, str], object] = {}  # (field, tier or "") -> bound counter

    def __call__(self, step: StepStats) -> None:
        s = step.stats
        self._running.set(s.num_running)
        self._waiting.set(s.num_waiting)
        self._kv.set(s.kv_cache_usage)
        self._count(s)
        self._count_offload(s)
        for ev in step.events:
            if ev.first_token:
                self._ttft.observe((ev.first_token_time if ev.first_token_time is not None else ev.now)
                                   - ev.arrival_time)
                self._last_token_time[ev.request_id] = ev.now
            elif ev.num_new_tokens and ev.request_id in self._last_token_time:
                # one observation per request per step, as vLLM does
                self._itl.observe(ev.now - self._last_token_time[ev.request_id])
                self._last_token_time[ev.request_id] = ev.now
            if ev.finished:
                self._last_token_time.pop(ev.request_id, None)
                reason = ev.finish_reason or "abort"
                (self._success.get(reason) or SUCCESS.labels(self.model_name, reason)).inc()
                self._e2e.observe(ev.now - ev.arrival_time)
                # a request aborted before it was ever scheduled waited all its life
                scheduled = ev.first_scheduled_time if ev.first_scheduled_time is not None else ev.now
                self._queue.observe(scheduled - ev.arrival_time)
                self._prompt_hist.observe(ev.num_prompt_tokens)
                self._gen_hist.observe(ev.num_generation_tokens)
        if len(self._last_token_time) > MAX_CLOCKS and step.events:
            cutoff = step.events[-1].now - STALE_CLOCK_SECONDS
            self._last_token_time = {r: t for r, t in self._last_token_time.items() if t >= cutoff}
        if self.max_loras > 0:
            self._set_lora(s)

    def _advance(self, key, value: int) -> int:
        """How far a cumulative engine figure moved since the last step (all of it after an engine restart)."""
        seen = self._seen.get(key, 0)
        self._seen[key] = value
        return value if value < seen else value - seen

    def _count(self, s: EngineStats) -> None:
        for name, counter in self._counters.items():
            delta = self._advance(name, getattr(s, name))
            if delta:
                counter.inc(delta)

    def _set_lora(self, s: EngineStats) -> None:
        labels = (self.model_name, str(self.max_loras), ",".join(s.waiting_loras), ",".join(s.running_loras))
        if labels != self._lora_labels:
            # vLLM leaves every past combination behind; dropping it keeps one current series per model
            if self._lora_labels is not None:
                LORA_INFO.remove(*self._lora_labels)
            self._lora_labels = labels
        LORA_INFO.labels(*labels).set(time.time())

    def _count_offload(self, s: EngineStats) -> None:
        for name, metric in _OFFLOAD.items():
            value = getattr(s, name)
            for tier, v in (value.items() if isinstance(value, dict) else [("", value)]):
                delta = self._advance((name, tier), v)
                if delta:
                    child = self._offload_children.get((name, tier))
                    if child is None:  # bound once, as the other counters
                        labels = (self.model_name, tier) if tier else (self.model_name,)
                        child = self._offload_children[name, tier] = metric.labels(*labels)
                    child.inc(delta)

    def close(self) -> None:
        """Drop this model's series (the model was unloaded); the logger must not be called after this."""
        for metric in _PER_MODEL:
            _remove(metric, self.model_name)
        for reason in FINISH_REASONS:
            _remove(SUCCESS, self.model_name, reason)
        for reason in REJECTED_REASONS:
            _remove(REJECTED, self.model_name, reason)
        if self._lora_labels is not None:
            _remove(LORA_INFO, *self._lora_labels)
            self._lora_labels = None
        for name, tier in self._offload_children:
            _remove(_OFFLOAD[name], self.model_name, *([tier] if tier else []))


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # never created (or already removed)
        pass
