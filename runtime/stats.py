"""Engine statistics: a snapshot for gauges (metrics, the scaler, health) and per-step events for counters
and latency histograms. The engine fills these; adapters/metrics.py turns them into Prometheus series."""
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    num_running: int = 0  # requests with at least one sequence scheduled or partially prefilled
    num_waiting: int = 0  # requests queued, not yet admitted (or preempted back to the queue)
    num_total_blocks: int = 0
    num_free_blocks: int = 0  # blocks with ref count 0 (cached-but-free blocks count as free)
    kv_cache_usage: float = 0.0  # 1 - free / total, in [0, 1]
    # cumulative counters since start
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_requests_finished: int = 0
    running_loras: list[str] = field(default_factory=list)
    waiting_loras: list[str] = field(default_factory=list)
    # KV offload (runtime/kv_offload.py); per-tier dicts are keyed "cpu", "disk", "remote"
    kv_offload_hits: dict[str, int] = field(default_factory=dict)  # chunks restored, by the tier they came from
    kv_offload_misses: int = 0  # chunk lookups at admission found in no tier
    kv_offload_recomputed: int = 0  # chunks found but recomputed, since that was estimated faster
    kv_offload_chunks_saved: dict[str, int] = field(default_factory=dict)
    kv_offload_saves_dropped: int = 0  # chunks not saved because the writer's queue was full
    kv_offload_bytes_loaded: dict[str, int] = field(default_factory=dict)
    kv_offload_bytes_saved: dict[str, int] = field(default_factory=dict)
    kv_offload_tokens_restored: int = 0  # tokens not computed because their chunks were loaded


@dataclass
class RequestEvent:
    """One request's progress within one engine step."""
    request_id: str
    num_prompt_tokens: int
    num_new_tokens: int  # generated this step (all sequences of the request)
    first_token: bool  # this step produced the request's first output token
    finished: bool
    finish_reason: str | None  # of the request when finished: "stop" | "length" | "abort"
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    now: float  # the step's end time (time.monotonic)
    num_generation_tokens: int  # total generated so far, all sequences
    lora: str | None = None


@dataclass
class StepStats:
    stats: EngineStats
    events: list[RequestEvent] = field(default_factory=list)
