"""The model runner: owns the weights, the one KV tensor, and turns a scheduled batch into logits."""
import json
import logging
import os

import torch

from kvserve.kernels import ops
from kvserve.kernels.metadata import AttentionMetadata
from kvserve.runtime.config import EngineConfig
from kvserve.runtime.context import set_context
from kvserve.runtime.models import build_model, model_config
from kvserve.runtime.sequence import Sequence
from kvserve.runtime.weights import load_weights

log = logging.getLogger("kvserve.runner")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16,
           "float": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        load_weights(self.model, config.model)
        self.model.eval()
        self.block_size = config.block_size
        self.num_blocks = self._num_blocks()
        self._allocate_kv_cache()

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
    def prepare(self, batch: list[tuple[Sequence, int]]):
        bs = self.block_size
        input_ids, positions, slots, cu, lens, tables, sample_rows = [], [], [], [0], [], [], []
        for seq, n in batch:
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            cu.append(cu[-1] + n)
            lens.append(start + n)
            tables.append(table)
            if start + n == seq.num_tokens:
                sample_rows.append(cu[-1] - 1)
        width = max(len(t) for t in tables)
        dev = self.device

        def to_dev(x, dtype):
            t = torch.tensor(x, dtype=dtype)
            return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t

        meta = AttentionMetadata(
            slot_mapping=to_dev(slots, torch.int64),
            cu_seqlens_q=to_dev(cu, torch.int32),
            seq_lens=to_dev(lens, torch.int32),
            block_tables=to_dev([t + [0] * (width - len(t)) for t in tables], torch.int32),
            max_seqlen_q=max(n for _, n in batch), max_seqlen_k=max(lens),
            cu_seqlens_q_cpu=cu, seq_lens_cpu=lens,
            decode_only=all(n == 1 for _, n in batch))
        return to_dev(input_ids, torch.int64), to_dev(positions, torch.int64), meta, to_dev(sample_rows, torch.int64)

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """fp32 logits for the sequences that reached the end of their known tokens, in batch order."""
        ids, pos, meta, rows = self.prepare(batch)
        set_context(meta)
        try:
            hidden = self.model(ids, pos)
        finally:
            set_context(None)
        return self.model.logits(hidden[rows]).float()
