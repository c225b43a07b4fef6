"""Requests and their sequences. A request with n > 1 fans out into n sequences sharing the prompt."""
from dataclasses import dataclass, field
from enum import Enum, auto
from functools import cached_property

from kvserve.runtime.outputs import Logprob
from kvserve.runtime.sampling_params import SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: "Request"
    index: int  # 0..n-1 within its request
    token_ids: list[int]  # prompt followed by generated tokens
    seed: int  # sampling noise key: reproducible whatever else shares the batch
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of the full blocks, in order
    lora_skips: int = 0  # steps admission passed this sequence over for want of an adapter slot
    num_cached_blocks: int = 0  # leading blocks already registered in the prefix cache
    # detokenizer state
    text: str = ""
    sent_text_len: int = 0  # chars of `text` already emitted
    prefix_offset: int = 0
    read_offset: int = 0
    logprobs: list[dict[int, Logprob]] | None = None
    sent_tokens: int = 0  # output tokens already emitted
    # Pipelined decode: while a step is in flight, its sampled token is a placeholder at token_ids[-1],
    # row `pending_row` of that step's token tensor on the device (-1: no placeholder).
    pending_row: int = -1
    finishing: bool = False  # will finish by length when the in-flight token lands: not scheduled again
    finish_sent: bool = False  # the delta carrying finish_reason has been emitted
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    lora: str | None = None
    lora_id: str = ""  # the adapter's content id (runtime/lora.py) at the time the request was made
    seqs: list[Sequence] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    stream: bool = True  # emit a delta every step; otherwise only the finished output
    stop_ids: frozenset = frozenset()  # token ids that end a sequence (stop_token_ids, and EOS unless ignored)
    max_total_tokens: int = 0  # prompt + max_tokens, capped at max_model_len
    incremental_text: bool = True  # detokenize every step (streaming, stop strings) or once at the end

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @cached_property
    def device_sampling(self) -> bool:
        """Sampling needs nothing from the host: no penalties (token histories), min_tokens or logprobs."""
        p = self.params
        return (p.logprobs is None and p.min_tokens == 0 and p.repetition_penalty == 1.0
                and not p.presence_penalty and not p.frequency_penalty)

    @property
    def cache_key(self) -> bytes:
        """Extra key mixed into every block hash: requests under different adapters never share KV, nor do
        requests under two different adapters loaded by the same name one after the other."""
        return f"{self.lora}\0{self.lora_id}".encode() if self.lora is not None else b""
