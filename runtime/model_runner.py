"""The model runner: owns the weights, the one KV tensor, and turns a scheduled batch into logits."""
import json
import logging
import os

import torch

from kvserve.kernels import ops
from kvserve.kernels.metadata import AttentionMetadata
from kvserve.runtime.config import EngineConfig
from kvserve.runtime.context import set_context
from kvserve.runtime.lora import LoRAManager
from kvserve.runtime.models import build_model, model_config
from kvserve.runtime.sequence import Sequence
from kvserve.runtime.weights import dummy_weights, load_weights

log = logging.getLogger("kvserve.runner")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16,
           "float": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no usable CUDA device")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device {name!r} is not supported: use auto, cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device, hf: dict) -> torch.dtype:
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use one of auto, float32, float16, bfloat16")
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    declared = _DTYPES.get(str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"), torch.bfloat16)
    return torch.bfloat16 if declared == torch.float32 else declared


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        with open(os.path.join(config.model, "config.json")) as f:
            self.hf_config = json.load(f)
        self.cfg = model_config(self.hf_config)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device, self.hf_config)
        ops.set_backend(config.attention_backend)
        max_pos = self.cfg.get("max_position_embeddings", 4096)
        self.max_model_len = config.max_model_len or max_pos
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = build_model(self.cfg, max(self.max_model_len, max_pos))
        finally:
            torch.set_default_dtype(default_dtype)
        if config.load_format == "dummy":
            dummy_weights(self.model)
        else:
            load_weights(self.model, config.model)
        self.model.eval()
        # LoRA slots are allocated before the KV pool is sized from what memory is left
        self.lora = LoRAManager(config, self.model, self.device, self.dtype) if config.max_loras > 0 else None
        self.block_size = config.block_size
        self.num_blocks = self._num_blocks()
        self._allocate_kv_cache()
        self.capture_graphs()

    # -- memory ---------------------------------------------------------------------------------------
    def _bytes_per_block(self) -> int:
        c = self.cfg
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * c["num_hidden_layers"] * self.block_size * c["num_key_value_heads"] * c["head_dim"] * elem

    def _num_blocks(self) -> int:
        if self.config.num_gpu_blocks_override:
            return self.config.num_gpu_blocks_override
        if self.device.type == "cpu":
            return max(1, int(self.config.cpu_kv_cache_gb * 2**30) // self._bytes_per_block())
        # CUDA: measure the activation peak of a full-budget step, then fill the allowed fraction
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        with torch.inference_mode():
            ids = torch.zeros(n, dtype=torch.long, device=self.device)
            pos = torch.arange(n, device=self.device)
            hidden = self._forward_without_cache(ids, pos)
            self.model.logits(hidden[-min(n, self.config.max_num_seqs):])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.gpu_memory_utilization - used_by_others - peak
        blocks = int(budget) // self._bytes_per_block()
        if blocks <= 0:
            raise ValueError("no GPU memory left for the KV cache; raise --gpu-memory-utilization "
                             "or lower --max-num-batched-tokens")
        return blocks

    def _forward_without_cache(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """A forward pass over one fresh sequence with a throwaway single-sequence cache (memory profiling)."""
        c = self.cfg
        nb = -(-ids.numel() // self.block_size)
        kv = torch.empty(2, nb, self.block_size, c["num_key_value_heads"], c["head_dim"],
                         dtype=self.dtype, device=self.device)
        for layer in self.model.model.layers:
            layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = kv[0], kv[1]
        n = ids.numel()
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n, device=self.device),
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(nb, dtype=torch.int32, device=self.device)[None],
            max_seqlen_q=n, max_seqlen_k=n, cu_seqlens_q_cpu=[0, n], seq_lens_cpu=[n])
        set_context(meta)
        try:
            return self.model(ids, pos)
        finally:
            set_context(None)

    def _allocate_kv_cache(self) -> None:
        c = self.cfg
        self.kv_cache = torch.zeros(2, c["num_hidden_layers"], self.num_blocks, self.block_size,
                                    c["num_key_value_heads"], c["head_dim"], dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.attn.v_cache = self.kv_cache[1, i]
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB, %s)", self.num_blocks, self.block_size,
                 self.kv_cache.numel() * self.kv_cache.element_size() / 2**30, self.dtype)

    # -- a step ---------------------------------------------------------------------------------------
    def prepare(self, batch: list[tuple[Sequence, int]]) -> dict:
        """Host lists describing the step: token ids, positions, KV slots, per-sequence lengths."""
        bs = self.block_size
        ids, pos, slots, cu, lens, tables, rows, subst = [], [], [], [0], [], [], [], []
        total = 0
        for seq, n in batch:
            start = seq.num_computed_tokens
            table = seq.block_table
            if n == 1:
                ids.append(seq.token_ids[start])
                pos.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                ids.extend(seq.token_ids[start:start + n])
                pos.extend(range(start, start + n))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            total += n
            cu.append(total)
            lens.append(start + n)
            tables.append(table)
            if start + n == len(seq.token_ids):
                rows.append(total - 1)
            if seq.pending_row >= 0:  # the input token is still on the device, sampled by the step in flight
                subst.append((total - 1, seq.pending_row))
        return dict(ids=ids, pos=pos, slots=slots, cu=cu, lens=lens, tables=tables, rows=rows, subst=subst,
                    decode=len(ids) == len(batch), lora=self.lora.prepare(batch) if self.lora else None)

    def _to_device(self, x: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(x, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _eager(self, step: dict) -> torch.Tensor:
        width = max(len(t) for t in step["tables"])
        meta = AttentionMetadata(
            slot_mapping=self._to_device(step["slots"], torch.int64),
            cu_seqlens_q=self._to_device(step["cu"], torch.int32),
            seq_lens=self._to_device(step["lens"], torch.int32),
            block_tables=self._to_device([t + [0] * (width - len(t)) for t in step["tables"]], torch.int32),
            max_seqlen_q=max(b - a for a, b in zip(step["cu"], step["cu"][1:])), max_seqlen_k=max(step["lens"]),
            cu_seqlens_q_cpu=step["cu"], seq_lens_cpu=step["lens"], decode_only=step["decode"])
        set_context(meta, None if step["lora"] is None else self._to_device(step["lora"], torch.int32))
        ids = self._to_device(step["ids"], torch.int64)
        self._substitute(ids, step["subst"])
        try:
            return self.model(ids, self._to_device(step["pos"], torch.int64))
        finally:
            set_context(None)

    def copy_to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """Start copying t to host memory; returns the copy and an event that completes with it."""
        if self.device.type != "cuda":
            return t, None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def _substitute(self, ids: torch.Tensor, subst: list[tuple[int, int]]) -> None:
        """Fill placeholder input ids from the previous step's sampled tokens, on the device."""
        if not subst:
            return
        dst, src = zip(*subst)
        n = len(subst)
        if dst == src and dst[-1] == n - 1:  # steady decode: same sequences in the same order
            ids[:n] = self.prev_tokens[:n]
        else:
            ids[self._to_device(list(dst), torch.int64)] = self.prev_tokens[self._to_device(list(src), torch.int64)]

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (model dtype) for the sequences that reached the end of their known tokens, in batch order."""
        step = self.prepare(batch)
        self.prev_tokens = prev_tokens
        graphs = self.graphs
        if graphs is not None and step["decode"] and len(batch) <= graphs.max_batch:
            hidden = graphs.replay(step)
        else:
            hidden = self._eager(step)
        rows = step["rows"]
        if len(rows) != hidden.shape[0]:
            hidden = hidden[self._to_device(rows, torch.int64)]
        return self.model.logits(hidden)

    def capture_graphs(self) -> None:
        self.graphs = None
        if self.device.type == "cuda" and not self.config.enforce_eager:
            self.graphs = DecodeGraphs(self)


class DecodeGraphs:
    """CUDA graphs of the decode forward pass at bucketed batch sizes. Inputs are copied into static buffers;
    padding rows write no KV (slot -1) and attend to one cached token, and their outputs are dropped."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        dev = runner.device
        self.max_batch = min(runner.config.max_num_seqs, 512)
        self.sizes = [s for s in [1, 2, 4, 8] + list(range(16, self.max_batch + 16, 16)) if s <= self.max_batch]
        if self.sizes[-1] != self.max_batch:
            self.sizes.append(self.max_batch)
        width = -(-runner.max_model_len // runner.block_size)
        n = self.max_batch
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(n, width, dtype=torch.int32, device=dev)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
        # per-token LoRA slots (-1: base model): with adapters enabled every graph holds the LoRA kernels
        self.lora_slots = torch.full((n,), -1, dtype=torch.int32, device=dev) if runner.lora else None
        # each step's inputs go up in one copy: ids, pos, slots, lens, LoRA slots, then the block table, packed
        # Two host buffers, alternating: with pipelined steps the host fills the next step's inputs while the
        # previous copy may still be queued.
        self.staging = [torch.zeros(5 * n + n * width, dtype=torch.int64).pin_memory() for _ in range(2)]
        self.staging_dev = torch.zeros_like(self.staging[0], device=dev)
        self.flip = 0
        self.width = width
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        model = runner.model
        for size in reversed(self.sizes):
            meta = self._meta(size)
            set_context(meta, None if self.lora_slots is None else self.lora_slots[:size])
            try:
                for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                    model(self.ids[:size], self.pos[:size])
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = model(self.ids[:size], self.pos[:size])
            finally:
                set_context(None)
            pool = graph.pool()
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(dev)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:size], cu_seqlens_q=self.cu[:size + 1], seq_lens=self.lens[:size],
            block_tables=self.tables[:size], max_seqlen_q=1, max_seqlen_k=self.runner.max_model_len,
            cu_seqlens_q_cpu=list(range(size + 1)), seq_lens_cpu=[1] * size, decode_only=True)

    def replay(self, step: dict) -> torch.Tensor:
        b = len(step["ids"])
        size = next(s for s in self.sizes if s >= b)
        widest = max(len(t) for t in step["tables"])
        # numpy fills the pinned buffer far faster than torch.tensor(list) builds one
        self.flip ^= 1
        host = self.staging[self.flip]
        st = host.numpy()
        st[0:b], st[size:size + b] = step["ids"], step["pos"]
        st[2 * size:2 * size + b], st[3 * size:3 * size + b] = step["slots"], step["lens"]
        st[b:size], st[size + b:2 * size], st[2 * size + b:3 * size], st[3 * size + b:4 * size] = 0, 0, -1, 1
        st[4 * size:5 * size] = -1
        if step["lora"]:
            st[4 * size:4 * size + b] = step["lora"]
        used = 5 * size + size * widest
        table = st[5 * size:used].reshape(size, widest)
        table[:] = 0
        for i, t in enumerate(step["tables"]):
            table[i, :len(t)] = t
        dev = self.staging_dev[:used]
        dev.copy_(host[:used], non_blocking=True)
        self.ids[:size].copy_(dev[:size])
        self.pos[:size].copy_(dev[size:2 * size])
        self.slots[:size].copy_(dev[2 * size:3 * size])
        self.lens[:size].copy_(dev[3 * size:4 * size])
        if self.lora_slots is not None:
            self.lora_slots[:size].copy_(dev[4 * size:5 * size])
        self.tables[:size, :widest].copy_(dev[5 * size:used].view(size, widest))
        self.runner._substitute(self.ids, step["subst"])
        graph, out = self.graphs[size]
        graph.replay()
        return out[:b]
