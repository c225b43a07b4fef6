"""KV offload (LMCache-style): full chunks of a sequence's KV are saved to host memory, a local folder and a
bucket shared by replicas, and restored at admission instead of being recomputed.

A chunk is `chunk_blocks` whole blocks, named by the prefix cache's hash of its last block (which covers every
token before it and the request's adapter) combined with the model identity, so a chunk is only ever loaded
into the model, dtype and layout that wrote it. Saves copy the blocks to host memory in the engine thread (the
blocks are freed right after) and leave serialisation and IO to a writer thread behind a bounded queue. Loads
happen at admission, after the GPU prefix-cache match, and only where loading is estimated faster than
recomputing.
"""
import glob
import hashlib
import json
import logging
import os
import struct
import threading
import time
import weakref
from collections import deque

import torch

from kvserve.runtime.block_manager import BlockManager
from kvserve.runtime.config import EngineConfig
from kvserve.runtime.kv_tiers import ChunkSpec, CpuTier, DiskTier, Notices, RemoteTier, encode_header, payload_view
from kvserve.runtime.sequence import Sequence
from kvserve.runtime.stats import EngineStats

log = logging.getLogger("kvserve.kv_offload")

# Bump when the meaning of a chunk's payload changes (the KV tensor's layout, how positions are encoded...):
# it is part of the model identity, so older chunks simply stop matching.
LAYOUT_VERSION = 1
# Load-or-recompute: the fixed cost of fetching one chunk from each tier, and read bandwidths (bytes/s) assumed
# until the first measured read.
FLOOR_S = {"cpu": 20e-6, "disk": 0.5e-3, "remote": 10e-3}
INITIAL_READ_BW = {"disk": 1e9, "remote": 1e8}
MIN_PREFILL_TOKENS = 128  # smaller steps say little about prefill throughput
EMA = 0.2
WRITER_QUEUE_BYTES = 1 << 30  # host copies waiting for the disk and remote tiers


def _weights_fingerprint(folder: str, load_format: str, device: torch.device) -> bytes:
    """Fine-tunes share config.json, safetensors headers and file sizes, but not their bytes: a few samples of
    every weights file tell them apart without reading gigabytes."""
    if load_format == "dummy":
        return f"dummy:{device.type}".encode()  # dummy_weights is seeded, but each device draws its own numbers
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}:{size}".encode())
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(n))
            start = 8 + n
            for i in range(16):
                f.seek(start + (size - start) * i // 16)
                h.update(f.read(4096))
    return h.digest()


def model_identity(config: EngineConfig, dtype: torch.dtype, device: torch.device, layout: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(os.path.join(config.model, "config.json"), "rb") as f:
        h.update(hashlib.blake2b(f.read(), digest_size=16).digest())
    h.update(_weights_fingerprint(config.model, config.load_format, device))
    h.update(json.dumps({"dtype": str(dtype), "layout_version": LAYOUT_VERSION, **layout}, sort_keys=True).encode())
    return h.hexdigest()


class OffloadStats:
    """Cumulative counters; the writer thread adds to them too."""

    def __init__(self):
        self.lock = threading.Lock()
        self.hits: dict[str, int] = {}  # chunks restored, by the tier they came from
        self.misses = 0  # chunk lookups found in no tier
        self.recomputed = 0  # chunks found but recomputed, since that was estimated faster
        self.chunks_saved: dict[str, int] = {}
        self.saves_dropped = 0  # chunks not saved because the writer's queue was full
        self.bytes_loaded: dict[str, int] = {}
        self.bytes_saved: dict[str, int] = {}
        self.tokens_restored = 0

    def saved(self, tier: str, nbytes: int) -> None:
        with self.lock:
            self.chunks_saved[tier] = self.chunks_saved.get(tier, 0) + 1
            self.bytes_saved[tier] = self.bytes_saved.get(tier, 0) + nbytes

    def loaded(self, tier: str, nbytes: int) -> None:
        with self.lock:
            self.hits[tier] = self.hits.get(tier, 0) + 1
            self.bytes_loaded[tier] = self.bytes_loaded.get(tier, 0) + nbytes

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def fill(self, s: EngineStats) -> None:
        with self.lock:
            s.kv_offload_hits, s.kv_offload_misses = dict(self.hits), self.misses
            s.kv_offload_recomputed = self.recomputed
            s.kv_offload_chunks_saved, s.kv_offload_saves_dropped = dict(self.chunks_saved), self.saves_dropped
            s.kv_offload_bytes_loaded, s.kv_offload_bytes_saved = dict(self.bytes_loaded), dict(self.bytes_saved)
            s.kv_offload_tokens_restored = self.tokens_restored


class Writer:
    """Saves behind the step loop: waits for each host copy to land, serialises it and writes it to the disk and
    remote tiers. The queue is bounded in bytes; a save that does not fit is dropped, never waited for."""

    def __init__(self, spec: ChunkSpec, tiers: list, stats: OffloadStats, max_bytes: int):
        self.spec, self.tiers, self.stats, self.max_bytes = spec, tiers, stats, max_bytes
        self.cond = threading.Condition()
        self.jobs: deque = deque()
        self.pending_bytes = 0  # queued or being written
        self.pending_keys: set[str] = set()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="kvserve-kv-writer", daemon=True)
        self.thread.start()

    def _fits(self, nbytes: int) -> bool:  # under self.cond; one job always fits, however large
        return self.pending_bytes == 0 or self.pending_bytes + nbytes <= self.max_bytes

    def has_room(self, nbytes: int) -> bool:
        with self.cond:
            return self._fits(nbytes)

    def pending(self, key: str) -> bool:
        with self.cond:
            return key in self.pending_keys

    def submit(self, key: str, host: torch.Tensor, event) -> bool:
        nbytes = host.numel() * host.element_size()
        with self.cond:
            if self.stopped or not self._fits(nbytes):
                return False
            self.jobs.append((key, host, event, nbytes))
            self.pending_bytes += nbytes
            self.pending_keys.add(key)
            self.cond.notify_all()
        return True

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.jobs and not self.stopped:
                    self.cond.wait()
                if not self.jobs:
                    return
                key, host, event, nbytes = self.jobs.popleft()
            try:
                if event is not None:
                    event.synchronize()  # the device-to-host copy has landed
                data = payload_view(host)
                header = encode_header(self.spec, key, data)
                for tier in self.tiers:
                    if tier.put(key, header, data):
                        self.stats.saved(tier.name, data.nbytes)
            except Exception:  # a bug in one save must not stop the ones after it
                log.exception("KV offload: saving chunk %s failed", key)
            finally:
                with self.cond:
                    self.pending_bytes -= nbytes
                    self.pending_keys.discard(key)
                    self.cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.pending_bytes == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        self.flush(timeout)
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


class KVOffload:
    @classmethod
    def create(cls, config: EngineConfig, runner, block_manager: BlockManager) -> "KVOffload | None":
        """None unless a tier is configured."""
        if config.kv_offload_enabled:
            return cls(config, runner, block_manager)
        return None

    def __init__(self, config: EngineConfig, runner, block_manager: BlockManager):
        self.bm = block_manager
        self.runner = runner
        self.kv = runner.kv_cache  # [2, layers, blocks, block_size, kv_heads, head_dim]
        self.device = runner.device
        self.cuda = self.device.type == "cuda"
        self.block_size = config.block_size
        self.chunk_blocks = max(1, config.kv_offload_chunk_tokens // config.block_size)
        _, layers, _, bs, heads, head_dim = self.kv.shape
        layout = dict(block_size=bs, chunk_blocks=self.chunk_blocks, layers=layers, kv_heads=heads, head_dim=head_dim)
        identity = model_identity(config, runner.dtype, self.device, layout)
        self.spec = ChunkSpec(identity, (2, layers, self.chunk_blocks, bs, heads, head_dim), runner.dtype)
        self.identity = bytes.fromhex(identity)
        self.notices = Notices()
        self.stats = OffloadStats()
        self.policy = config.kv_offload_policy
        nbytes = self.spec.nbytes
        self.cpu = CpuTier(int(config.kv_offload_cpu_gb * 2**30)) if config.kv_offload_cpu_gb > 0 else None
        if self.cpu is not None and self.cpu.cap < nbytes:
            self.notices.warn("cpu", "too small", "its cap of %d bytes (--kv-offload-cpu-gb) holds no chunk of %d "
                              "bytes", self.cpu.cap, nbytes)
        self.disk = None
        if config.kv_offload_disk_path:
            try:
                self.disk = DiskTier(config.kv_offload_disk_path, int(config.kv_offload_disk_gb * 2**30), self.notices)
            except OSError as e:
                self.notices.warn("disk", "unusable", "cannot use %s (%s); running without the disk tier",
                                  config.kv_offload_disk_path, e)
        self.remote = RemoteTier(config.kv_offload_remote, int(config.kv_offload_remote_gb * 2**30), self.notices) \
            if config.kv_offload_remote else None
        self.tiers = [t for t in (self.cpu, self.disk, self.remote) if t is not None]  # fastest first
        writes = [t for t in (self.disk, self.remote) if t is not None]
        self.writer = Writer(self.spec, writes, self.stats, WRITER_QUEUE_BYTES) if writes else None
        # load-or-recompute estimates
        self.s_per_token: float | None = None  # prefill seconds per token, from this engine's own steps
        self.read_bw = dict(INITIAL_READ_BW)
        self.copy_bw = self._probe_copy_bandwidth()  # host -> KV cache
        # copies up queued on the device and not yet taken out of a step's time: (when queued, estimated seconds)
        self._copies: list[tuple[float, float]] = []
        log.info("KV offload: chunks of %d blocks (%.1f MiB), tiers %s, policy %s, host->cache copy %.1f GB/s",
                 self.chunk_blocks, nbytes / 2**20, ", ".join(self._describe(t) for t in self.tiers), self.policy,
                 self.copy_bw / 1e9)
        if self.writer is not None:  # at exit (or when the engine goes away) queued saves get a moment to land
            weakref.finalize(self, self.writer.close, 10.0)

    @staticmethod
    def _describe(tier) -> str:
        parts = [tier.name, str(getattr(tier, "uri", None) or getattr(tier, "folder", ""))]
        if tier.cap:
            parts.append(f"{tier.cap / 2**30:.3g} GiB")
        return " ".join(p for p in parts if p)

    # -- naming --------------------------------------------------------------------------------------------------
    def chunk_keys(self, seq: Sequence, num_chunks: int) -> list[str]:
        """Keys of seq's first num_chunks chunks (their blocks must be full of known tokens)."""
        c = self.chunk_blocks
        hashes = self.bm._hashes(seq, num_chunks * c)
        return [hashlib.blake2b(self.identity + hashes[(j + 1) * c - 1], digest_size=16).hexdigest()
                for j in range(num_chunks)]

    # -- host memory ---------------------------------------------------------------------------------------------
    def _alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def _probe_copy_bandwidth(self) -> float:
        n = min(self.spec.nbytes, 64 << 20)
        src, dst = self._alloc(n), torch.empty(n, dtype=torch.uint8, device=self.device)
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        best = float("inf")
        for _ in range(4):  # the best of a few: the first copies in a process pay for warming up
            sync()
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            sync()
            best = min(best, time.perf_counter() - t)
        return n / max(best, 1e-9)

    # -- save ----------------------------------------------------------------------------------------------------
    def _stored(self, key: str) -> bool:
        return any(t.contains(key) for t in self.tiers) or (self.writer is not None and self.writer.pending(key))

    def save(self, seq: Sequence) -> None:
        """Hand over seq's full, computed chunks that no tier holds yet; call before its blocks are freed."""
        c = self.chunk_blocks
        n = seq.num_computed_tokens // self.block_size // c
        if n == 0 or not self.tiers:
            return
        nbytes = self.spec.nbytes
        for j, key in enumerate(self.chunk_keys(seq, n)):
            if self._stored(key):
                continue
            if self.cpu is None and not self.writer.has_room(nbytes):
                self.stats.add(saves_dropped=1)  # no copy at all while the writer is behind
                continue
            try:
                host, event = self._copy_out(seq.block_table[j * c:(j + 1) * c])
            except Exception as e:  # e.g. no pinned memory left: a save lost, not a dead engine
                self.notices.warn("cpu" if self.cpu else "host", "error", "copying a chunk out failed (%r); "
                                  "not saving it", e)
                self.stats.add(saves_dropped=1)
                continue
            if self.cpu is not None and self.cpu.put(key, host):
                self.stats.saved("cpu", nbytes)
            if self.writer is not None and not self.writer.submit(key, host, event):
                self.stats.add(saves_dropped=1)

    def _copy_out(self, block_ids: list[int]) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """The blocks' KV as one host chunk. On CUDA: gathered on the device and copied down asynchronously
        into pinned memory, so the step loop does not wait (the event marks the copy's end); later steps may
        reuse the blocks, but their writes are ordered after this copy on the same stream."""
        return self.runner.copy_to_host(self.kv.index_select(2, self.runner._to_device(block_ids, torch.long)))

    # -- load ----------------------------------------------------------------------------------------------------
    def load_estimate(self, tier: str) -> float:
        """Seconds to bring one chunk from `tier` into the KV cache."""
        n = self.spec.nbytes
        return FLOOR_S[tier] + (0.0 if tier == "cpu" else n / self.read_bw[tier]) + n / self.copy_bw

    def _worth_loading(self, tier: str, tokens: int) -> bool:
        if self.policy == "always" or self.s_per_token is None:
            return True
        return self.load_estimate(tier) < tokens * self.s_per_token

    def _find(self, key: str, tokens: int) -> tuple[str, torch.Tensor] | str | None:
        """(tier, host tensor) of the first tier worth loading from that holds the chunk; "recompute" when a
        tier holds it but recomputing is faster; None if no tier has it."""
        skipped = False
        for tier in self.tiers:
            if (tier is self.cpu and not tier.contains(key)) or (tier is self.remote and not tier.up()):
                continue
            if not self._worth_loading(tier.name, tokens):
                skipped = skipped or tier.contains(key)
                continue
            if tier is self.cpu:
                return "cpu", tier.get(key)
            t = time.perf_counter()
            try:
                raw = tier.get(key, self.spec, self._alloc)
            except Exception as e:  # e.g. no pinned memory left: a miss, not a dead engine
                self.notices.warn(tier.name, "error", "loading a chunk failed (%r); recomputing its tokens", e)
                raw = None
            if raw is None:
                continue
            self.read_bw[tier.name] = (1 - EMA) * self.read_bw[tier.name] + EMA * raw.numel() / max(
                time.perf_counter() - t, 1e-6)
            host = raw.view(self.spec.dtype).view(self.spec.shape)
            if self.cpu is not None and self.cpu.put(key, host):  # promote: the next hit is a host-memory hit
                self.stats.saved("cpu", raw.numel())
            return tier.name, host
        return "recompute" if skipped else None

    def load(self, seq: Sequence) -> int:
        """After the GPU prefix match: restore the longest run of further chunks any tier holds into new blocks,
        register them in the prefix cache and advance seq's computed tokens. Returns the tokens restored."""
        if self.policy == "never":
            return 0
        bs, c = self.block_size, self.chunk_blocks
        start = len(seq.block_table)
        assert seq.num_computed_tokens == start * bs
        limit = (seq.num_tokens - 1) // bs  # at least one token is computed: that step yields the logits
        last_chunk = min(-(-limit // c), seq.num_tokens // bs // c)  # chunks whose blocks are all known
        first_chunk = start // c
        if start >= limit or first_chunk >= last_chunk:
            return 0
        plan = []  # (tier, host chunk, first block, end block within the chunk)
        keys = self.chunk_keys(seq, last_chunk)
        for j in range(first_chunk, last_chunk):
            lo, hi = max(start, j * c) - j * c, min((j + 1) * c, limit) - j * c
            found = self._find(keys[j], (hi - lo) * bs)
            if found is None:
                self.stats.add(misses=1)
                break
            if found == "recompute":
                self.stats.add(recomputed=1)
                break
            plan.append((*found, lo, hi))
        room = self.bm.num_free - 1  # leave a block for the tokens still to compute
        fitting, total = [], 0
        for tier, host, lo, hi in plan:
            take = min(hi - lo, room - total)
            if take <= 0:
                break
            fitting.append((tier, host, lo, lo + take))
            total += take
        plan = fitting
        if total == 0 or not self.bm.allocate(seq, total * bs):
            return 0
        ids = seq.block_table[start:start + total]
        pos = 0
        for tier, host, lo, hi in plan:
            src = host.to(self.device, non_blocking=True) if self.cuda else host
            self.kv.index_copy_(2, self.runner._to_device(ids[pos:pos + hi - lo], torch.long), src[:, :, lo:hi])
            pos += hi - lo
            self.stats.loaded(tier, self.spec.nbytes)
        seq.num_computed_tokens += total * bs
        self.bm.cache_full_blocks(seq)
        self.stats.add(tokens_restored=total * bs)
        if self.cuda:  # the copies run on the compute stream, ahead of the next step's forward pass
            self._copies.append((time.perf_counter(), len(plan) * self.spec.nbytes / self.copy_bw))
        return total * bs

    # -- the load-or-recompute estimate --------------------------------------------------------------------------
    def observe_step(self, tokens: int, seconds: float) -> None:
        """A step's computed tokens and its time, from its launch to its tokens on the host: prefill
        throughput. Copies up queued before the launch ran ahead of it on the device: their time is taken out."""
        started = time.perf_counter() - seconds
        seconds -= sum(c for t, c in self._copies if t <= started)
        self._copies = [(t, c) for t, c in self._copies if t > started]
        if tokens < MIN_PREFILL_TOKENS or seconds <= 0:
            return
        x = seconds / tokens
        self.s_per_token = x if self.s_per_token is None else (1 - EMA) * self.s_per_token + EMA * x

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued saves to reach the disk and remote tiers; False on timeout."""
        return self.writer is None or self.writer.flush(timeout)
