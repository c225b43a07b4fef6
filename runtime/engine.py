"""The engine: requests in, one scheduled step at a time, output deltas out. Single-threaded by design;
AsyncEngine runs it on a background thread."""
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
from kvserve.runtime.model_runner import ModelRunner
from kvserve.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvserve.runtime.sampler import sample
from kvserve.runtime.sampling_params import SamplingParams
from kvserve.runtime.scheduler import Scheduler
from kvserve.runtime.sequence import Request, Sequence, Status
from kvserve.runtime.stats import EngineStats, RequestEvent, StepStats

log = logging.getLogger("kvserve.engine")


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
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished_requests = 0
        self.computed_prompt_tokens = 0  # prompt tokens that went through the model (not the cache)

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
        if lora is not None:
            raise ValueError(f"unknown LoRA adapter {lora!r}")
        req = Request(request_id, text, ids, params, time.monotonic(), lora)
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
        self.requests[req.request_id] = req
        self.prompt_tokens += len(req.prompt_token_ids)
        for seq in req.seqs:
            self.scheduler.add(seq)

    def add_request(self, prompt, params: SamplingParams, request_id: str, lora: str | None = None,
                    stream: bool = True) -> Request:
        req = self.make_request(prompt, params, request_id, lora, stream)
        self.add(req)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final delta (None if unknown or done)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._finish_request(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- a step ---------------------------------------------------------------------------------------
    def step(self) -> tuple[list[RequestOutput], StepStats]:
        batch = self.scheduler.schedule()
        now = time.monotonic()
        for seq, n in batch:
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = now
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.computed_prompt_tokens += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
        logits = self.runner.run(batch) if batch else None
        sampling = [seq for seq, n in batch if seq.num_computed_tokens + n == seq.num_tokens]
        result = sample(logits, sampling, self.eos_ids) if sampling else None
        for seq, n in batch:
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
        touched: dict[str, Request] = {}
        new_tokens: dict[str, int] = {}
        first: set[str] = set()
        now = time.monotonic()
        for i, seq in enumerate(sampling):
            req = seq.request
            self._append(seq, result.token_ids[i], result.logprobs[i])
            if req.first_token_time is None:
                req.first_token_time = now
                first.add(req.request_id)
            touched[req.request_id] = req
            new_tokens[req.request_id] = new_tokens.get(req.request_id, 0) + 1
        outputs, events = [], []
        for rid, req in touched.items():
            done = req.finished
            outputs.append(self._finish_request(req) if done else self._delta(req))
            events.append(RequestEvent(
                rid, len(req.prompt_token_ids), new_tokens[rid], rid in first, done,
                self._request_finish_reason(req) if done else None, req.arrival_time,
                req.first_scheduled_time, req.first_token_time, now,
                sum(s.num_output_tokens for s in req.seqs), req.lora))
        self.generation_tokens += len(sampling)
        return outputs, StepStats(self.stats(), events)

    def _append(self, seq: Sequence, token: int, logprobs) -> None:
        p = seq.params
        seq.token_ids.append(token)
        if logprobs is not None:
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(logprobs)
        incremental = seq.request.incremental_text
        stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)
        if stop_token:
            seq.finish_reason, seq.stop_reason = "stop", (token if token in p.stop_token_ids else None)
        elif incremental:
            before = len(seq.text)
            detokenize(self.tokenizer, seq)
            check_stop_strings(seq, len(seq.text) - before)
        if seq.finish_reason is None and (
                (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens)
                or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            if self.tokenizer is not None and seq.stop_reason not in p.stop:
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
        return EngineStats(
            num_running=len({q.request.request_id for q in s.running}),
            num_waiting=len({q.request.request_id for q in s.waiting} - {q.request.request_id for q in s.running}),
            num_total_blocks=len(bm.blocks), num_free_blocks=bm.num_free, kv_cache_usage=bm.usage(),
            prefix_cache_queries=s.prefix_queries, prefix_cache_hits=s.prefix_hits,
            num_preemptions=s.num_preemptions, prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens, num_requests_finished=self.finished_requests,
            running_loras=sorted({q.request.lora for q in s.running if q.request.lora}),
            waiting_loras=sorted({q.request.lora for q in s.waiting if q.request.lora}))
