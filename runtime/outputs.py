"""What the engine hands back: vLLM's RequestOutput / CompletionOutput shapes.

The engine emits deltas (the new tokens and text of one step); LLM.generate and the adapters that do not
stream accumulate them with `merge`.
"""
from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # one dict per token: {token_id: Logprob}, holding the chosen token and the top-N; None when not asked for
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0

    def merge(self, delta: "RequestOutput") -> None:
        """Fold a later delta of the same request into this accumulated output."""
        by_index = {o.index: o for o in self.outputs}
        for d in delta.outputs:
            o = by_index.get(d.index)
            if o is None:
                o = CompletionOutput(index=d.index, logprobs=[] if d.logprobs is not None else None)
                self.outputs.append(o)
                by_index[d.index] = o
            o.text += d.text
            o.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                o.logprobs = (o.logprobs or []) + d.logprobs
            if d.finish_reason is not None:
                o.finish_reason, o.stop_reason = d.finish_reason, d.stop_reason
        self.outputs.sort(key=lambda o: o.index)
        self.finished = delta.finished
        self.metrics = delta.metrics or self.metrics
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
