"""The scheduler: one token budget per step, handed out to close each sequence's gap between the tokens it
knows and the tokens whose K/V are computed (vLLM v1's rule). That one rule gives chunked prefill, mixed
prefill + decode steps and prefix-cache skips; when blocks run out, the newest running sequence is preempted
and later recomputed."""
from collections import deque

from kvserve.runtime.block_manager import BlockManager
from kvserve.runtime.config import EngineConfig
from kvserve.runtime.sequence import Sequence, Status

# Steps a waiting sequence may be passed over because its adapter has no free device slot. After that no
# sequence of an adapter is admitted until one frees (base-model sequences still are): running adapters drain,
# and steady traffic to them cannot starve it.
MAX_LORA_SKIPS = 32


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_loras = config.max_loras  # distinct adapters the running sequences may use at once
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0  # tokens looked up in the prefix cache at admission
        self.prefix_hits = 0  # of those, found
        self.offload = None  # runtime/kv_offload.py's KVOffload, set by the engine when a tier is configured

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Sequences to run this step with how many new tokens each."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.finishing:  # its last token is in flight
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n))
                budget -= n
                i += 1
        # Admit new work only when nothing had to be preempted: blocks are short.
        loras = {s.request.lora for s in self.running} - {None} if self.max_loras else set()  # LoRA off: none
        skipped: list[Sequence] = []  # their adapter would need a device slot that running adapters hold
        hold = False
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            lora = seq.request.lora
            if lora is not None and lora not in loras and len(loras) >= self.max_loras:
                seq.lora_skips += 1
                hold = hold or seq.lora_skips > MAX_LORA_SKIPS
                skipped.append(self.waiting.popleft())
                continue
            if lora is not None and hold:  # an adapter waited too long: no more work for the running ones
                skipped.append(self.waiting.popleft())
                continue
            restored = 0
            if not seq.block_table:
                self.bm.match_prefix(seq)
                if self.offload is not None:  # chunks beyond the GPU hit, from host memory, disk or the bucket
                    restored = self.offload.load(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.bm.allocate(seq, n):
                self.bm.free_seq(seq)  # give back the prefix hits too; retried next step
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if self.bm.enable_prefix_caching:
                self.prefix_queries += seq.num_tokens
                self.prefix_hits += seq.num_computed_tokens - restored
            if seq.request.first_scheduled_time is None:
                seq.request.num_cached_tokens = seq.num_computed_tokens
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
            if lora is not None:
                loras.add(lora)
        self.waiting.extendleft(reversed(skipped))
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        if self.offload is not None:
            self.offload.save(seq)
        self.bm.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence from the queues and return its blocks."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if self.offload is not None:
            self.offload.save(seq)
        self.bm.free_seq(seq)
        seq.status = Status.FINISHED
