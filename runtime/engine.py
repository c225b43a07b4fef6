"""The engine: requests in, one scheduled step at a time, output deltas out. Single-threaded by design;
AsyncEngine runs it on a background thread."""
from dataclasses import dataclass
import itertools
import json
import logging
import os
import random
import time

from transformers import AutoTokenizer

from kvserve.runtime.block_manager import BlockManager
from kvserve.runtime.config import EngineConfig
from kvserve.runtime.detokenizer import check_stop_strings, detokenize, init_offsets, take_text_delta
from kvserve.runtime.kv_offload import KVOffload
from kvserve.runtime.lora import LoRAInfo
from kvserve.runtime.model_runner import ModelRunner
from kvserve.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvserve.runtime.sampler import needs_host, sample, sample_tokens
from kvserve.runtime.sampling_params import SamplingParams
from kvserve.runtime.scheduler import Scheduler
from kvserve.runtime.sequence import Request, Sequence
from kvserve.runtime.stats import EngineStats, RequestEvent, StepStats

log = logging.getLogger("kvserve.engine")


@dataclass
class _Step:
    """A step launched on the device and not yet completed."""
    batch: list[tuple[Sequence, int]]
    sampling: list[Sequence]  # the sequences that get a token from it, in row order
    logits: object
    tokens: object  # the sampled token ids on the device, or None when sampling needs the host
    started: float
    tokens_host: object = None  # their copy in host memory, valid once `ready` has completed
    ready: object = None  # a CUDA event, or None off CUDA


def _eos_ids(folder: str, tokenizer) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    path = os.path.join(folder, "generation_config.json")
    if os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.tokenizer = None if config.skip_tokenizer_init else AutoTokenizer.from_pretrained(
            config.tokenizer or config.model)
        self.runner = ModelRunner(config)
        for name, path in (config.lora_modules or {}).items():
            self.add_lora(name, path)
        capacity = self.runner.num_blocks * config.block_size
        if config.max_model_len and config.max_model_len > capacity:
            raise ValueError(f"max_model_len {config.max_model_len} does not fit the KV cache "
                             f"({self.runner.num_blocks} blocks of {config.block_size} = {capacity} tokens)")
        config.max_model_len = min(self.runner.max_model_len, capacity)
        self.max_model_len = config.max_model_len
        self.vocab_size = self.runner.cfg["vocab_size"]
        self.eos_ids = _eos_ids(config.model, self.tokenizer) if self.tokenizer is not None else set()
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.offload = KVOffload.create(config, self.runner, self.block_manager)  # None unless a tier is set
        self.scheduler.offload = self.offload
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished_requests = 0
        self.computed_prompt_tokens = 0  # prompt tokens that went through the model (not the cache)
        self._inflight: _Step | None = None  # a launched step whose tokens are not read back yet
        self.record_events = True  # per-request events for stat loggers (LLM turns them off)
        self.pending_events: list[RequestEvent] = []

    # -- requests -------------------------------------------------------------------------------------
    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                     lora: str | None = None, stream: bool = True) -> Request:
        """Tokenize and validate; touches no engine state, so any thread may call it. `stream`: text is
        wanted step by step; otherwise it is decoded once at the end unless stop strings need it earlier."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (the engine runs with skip_tokenizer_init)")
            if not prompt:
                raise ValueError("prompt is empty")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
                raise ValueError("prompt token ids must be integers")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, but the model allows at most "
                             f"{self.max_model_len - 1} prompt tokens (max_model_len {self.max_model_len})")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs {params.logprobs} exceeds the maximum of {self.config.max_logprobs}")
        lora_id = self._lora(lora).content_id if lora is not None else ""
        req = Request(request_id, text, ids, params, time.monotonic(), lora, lora_id)
        req.stream = stream
        req.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_ids))
        limit = self.max_model_len if params.max_tokens is None else len(ids) + params.max_tokens
        req.max_total_tokens = min(limit, self.max_model_len)
        req.incremental_text = self.tokenizer is not None and (stream or bool(params.stop))
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        for i in range(params.n):
            seed = (base_seed + i * 0x9E3779B97F4A7C15) & ((1 << 63) - 1)
            seq = Sequence(next(self._seq_ids), req, i, list(ids), seed)
            init_offsets(seq)
            req.seqs.append(seq)
        return req

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if req.lora is not None and self._lora(req.lora).content_id != req.lora_id:
            raise ValueError(f"LoRA adapter {req.lora!r} was replaced after the request was made; send it again")
        self.requests[req.request_id] = req
        self.prompt_tokens += len(req.prompt_token_ids)
        for seq in req.seqs:
            self.scheduler.add(seq)

    def add_request(self, prompt, params: SamplingParams, request_id: str, lora: str | None = None,
                    stream: bool = True) -> Request:
        req = self.make_request(prompt, params, request_id, lora, stream)
        self.add(req)
        return req

    # -- LoRA adapters --------------------------------------------------------------------------------
    def add_lora(self, name: str, path: str) -> LoRAInfo:
        """Load the PEFT adapter in local folder `path` as `name`; ValueError if it does not fit the model, the
        limits or the allowed roots. Any thread may call it: the engine loop only sees a finished entry."""
        return self._lora_manager().add(name, path)

    def remove_lora(self, name: str) -> None:
        """Unload an adapter. Refused while requests use it (their KV and slot stay valid to the end); call
        on the engine's thread, so that requests already handed in count."""
        manager = self._lora_manager()
        users = sum(1 for r in self.requests.values() if r.lora == name)
        if users:
            raise ValueError(f"LoRA adapter {name!r} is in use by {users} request(s); unload it once they finish")
        manager.remove(name)

    def list_loras(self) -> list[LoRAInfo]:
        return self.runner.lora.loaded() if self.runner.lora is not None else []

    def _lora_manager(self):
        if self.runner.lora is None:
            raise ValueError("LoRA adapters are not enabled: start the engine with max_loras > 0 or lora_modules")
        return self.runner.lora

    def _lora(self, name: str) -> LoRAInfo:
        info = self.runner.lora.get(name) if self.runner.lora is not None else None
        if info is None:
            known = ", ".join(sorted(i.name for i in self.list_loras())) or "none"
            raise ValueError(f"unknown LoRA adapter {name!r} (loaded: {known})")
        return info

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final delta (None if unknown or done)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        if self.record_events:
            self.pending_events.append(self._event(req, 0, False, time.monotonic()))
        return self._finish_request(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- a step ---------------------------------------------------------------------------------------
    def step(self) -> tuple[list[RequestOutput], StepStats]:
        """Run one step and return the outputs it produced.

        Pipelined: when a step's sampling needs nothing from the host, its tokens stay on the device while
        the next step is scheduled and launched with placeholders for them; only then are they read back.
        The host's bookkeeping thus overlaps the device's work. A sequence that turns out to have stopped
        (EOS, a stop string) computed one token too many in the step in flight; that token is dropped.
        """
        cur = self._inflight or self._launch(self.scheduler.schedule())
        self._inflight = None
        if cur is None:
            return [], self.step_stats()
        if cur.tokens is not None:  # sampled on the device: launch the next step before reading them back
            for i, seq in enumerate(cur.sampling):
                if seq.finished:
                    continue
                if len(seq.token_ids) + 1 >= seq.request.max_total_tokens:
                    seq.finishing = True  # its last token: nothing more to schedule
                else:
                    seq.token_ids.append(-1)
                    seq.pending_row = i
            self._inflight = self._launch(self.scheduler.schedule(), cur.tokens)
        return self._complete(cur), self.step_stats()

    def _launch(self, batch: list[tuple[Sequence, int]], prev_tokens=None) -> "_Step | None":
        """Start a step on the device and do the bookkeeping that does not depend on its tokens."""
        if not batch:
            return None
        if self.runner.lora is not None:
            # Tokens of one adapter side by side: the LoRA kernels tile tokens, and a tile of one adapter reads
            # that adapter's weights once instead of every adapter's. Order within a step changes nothing else.
            batch.sort(key=lambda item: item[0].request.lora or "")
        now = time.monotonic()
        for seq, n in batch:
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = now
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.computed_prompt_tokens += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
        started = time.perf_counter()
        logits = self.runner.run(batch, prev_tokens)
        sampling = []  # sequences whose step reached the end of their known tokens: they get a new token
        for seq, n in batch:
            seq.num_computed_tokens += n
            if seq.pending_row < 0:  # a placeholder is hashed once it is known
                self.block_manager.cache_full_blocks(seq)
            if seq.num_computed_tokens == len(seq.token_ids):
                sampling.append(seq)
        step = _Step(batch, sampling, logits, None, started)
        if sampling and not needs_host(sampling):
            step.tokens = sample_tokens(logits, sampling)
            # queue the read-back now: behind the next step's kernels it would wait for those too
            step.tokens_host, step.ready = self.runner.copy_to_host(step.tokens)
        return step

    def _complete(self, cur: "_Step") -> list[RequestOutput]:
        """Read the step's tokens back and finish its bookkeeping: stops, text, outputs, events."""
        sampling = cur.sampling
        if not sampling:
            return []
        if cur.tokens is not None:
            if cur.ready is not None:
                cur.ready.synchronize()
            token_ids, logprobs = cur.tokens_host.tolist(), [None] * len(sampling)
        else:
            result = sample(cur.logits, sampling, self.eos_ids)
            token_ids, logprobs = result.token_ids, result.logprobs
        if self.offload is not None:  # the read-back waited for the device: the step's compute time
            self.offload.observe_step(sum(n for _, n in cur.batch), time.perf_counter() - cur.started)
        touched: dict[str, Request] = {}
        new_tokens: dict[str, int] = {}
        first: set[str] = set()
        now = time.monotonic()
        for i, seq in enumerate(sampling):
            if seq.pending_row >= 0:
                seq.token_ids.pop()  # the placeholder; _append puts the real token in its place
                seq.pending_row = -1
                placeholder_filled = True
            else:
                placeholder_filled = False
            if seq.finished:  # aborted, or stopped while this step was in flight
                continue
            req = seq.request
            self._append(seq, token_ids[i], logprobs[i])
            if placeholder_filled and not seq.finished:
                self.block_manager.cache_full_blocks(seq)  # the blocks the step in flight filled
            if req.first_token_time is None:
                req.first_token_time = now
                first.add(req.request_id)
            touched[req.request_id] = req
            new_tokens[req.request_id] = new_tokens.get(req.request_id, 0) + 1
        outputs = []
        for rid, req in touched.items():
            done = req.finished
            if done:
                outputs.append(self._finish_request(req))
            elif req.stream:
                outputs.append(self._delta(req))
            if self.record_events:
                self.pending_events.append(self._event(req, new_tokens[rid], rid in first, now))
        self.generation_tokens += sum(new_tokens.values())
        return outputs

    def step_stats(self) -> StepStats:
        """The current snapshot and the request events since the last call."""
        events, self.pending_events = self.pending_events, []
        return StepStats(self.stats(), events)

    def _event(self, req: Request, new_tokens: int, first: bool, now: float) -> RequestEvent:
        done = req.finished
        return RequestEvent(
            req.request_id, len(req.prompt_token_ids), new_tokens, first, done,
            self._request_finish_reason(req) if done else None, req.arrival_time, req.first_scheduled_time,
            req.first_token_time, now, sum(s.num_output_tokens for s in req.seqs), req.lora)

    def _append(self, seq: Sequence, token: int, logprobs) -> None:
        req = seq.request
        seq.token_ids.append(token)
        if logprobs is not None:
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(logprobs)
        stop_token = token in req.stop_ids
        if stop_token:
            seq.finish_reason = "stop"
            seq.stop_reason = token if token in req.params.stop_token_ids else None
        elif req.incremental_text:
            before = len(seq.text)
            detokenize(self.tokenizer, seq)
            check_stop_strings(seq, len(seq.text) - before)
        if seq.finish_reason is None and len(seq.token_ids) >= req.max_total_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            if self.tokenizer is not None and seq.stop_reason not in req.params.stop:
                # the rest of the text; a stop token's own text is not part of the output
                detokenize(self.tokenizer, seq, flush=True, exclude_last=stop_token)
            self.scheduler.finish(seq)

    def _delta(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            new_ids = seq.output_token_ids[seq.sent_tokens:]
            text = take_text_delta(seq)
            if not new_ids and not text and not (seq.finished and not seq.finish_sent):
                continue
            lps = seq.logprobs[seq.sent_tokens:] if seq.logprobs is not None else None
            seq.sent_tokens = seq.num_output_tokens
            seq.finish_sent = seq.finished
            outs.append(CompletionOutput(seq.index, text, new_ids, lps, seq.finish_reason, seq.stop_reason))
        metrics = RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time,
                                 time.monotonic(), None, req.num_cached_tokens)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished,
                             metrics, req.num_cached_tokens)

    def _finish_request(self, req: Request) -> RequestOutput:
        out = self._delta(req)
        out.finished = True
        out.metrics.finished_time = time.monotonic()
        del self.requests[req.request_id]
        self.finished_requests += 1
        return out

    @staticmethod
    def _request_finish_reason(req: Request) -> str:
        reasons = {s.finish_reason for s in req.seqs}
        return "abort" if "abort" in reasons else "length" if "length" in reasons else "stop"

    def stats(self) -> EngineStats:
        s, bm = self.scheduler, self.block_manager
        stats = EngineStats(
            num_running=len({q.request.request_id for q in s.running}),
            num_waiting=len({q.request.request_id for q in s.waiting} - {q.request.request_id for q in s.running}),
            num_total_blocks=len(bm.blocks), num_free_blocks=bm.num_free, kv_cache_usage=bm.usage(),
            prefix_cache_queries=s.prefix_queries, prefix_cache_hits=s.prefix_hits,
            num_preemptions=s.num_preemptions, prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens, num_requests_finished=self.finished_requests,
            running_loras=sorted({q.request.lora for q in s.running if q.request.lora}),
            waiting_loras=sorted({q.request.lora for q in s.waiting if q.request.lora}))
        if self.offload is not None:
            self.offload.stats.fill(stats)
        return stats
