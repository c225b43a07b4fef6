"""Building blocks shared by the decoder models: linear layers that load HF checkpoint shards into fused
weights, RMSNorm, rotary tables, and the paged attention layer."""
import math

import torch
from torch import nn
import torch.nn.functional as F

from kvserve.kernels import ops
from kvserve.kernels.metadata import AttentionMetadata
from kvserve.runtime.context import get_lora_slots


def _empty(*shape) -> nn.Parameter:
    # No initialisation: every parameter is overwritten by the checkpoint, and init is slow for big models.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b). `shards` lists the output sizes of the HF tensors fused into this one (q/k/v or
    gate/up); `weight_loader` copies a checkpoint tensor into its shard's rows."""

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False):
        super().__init__()
        self.shards = out_features if isinstance(out_features, list) else [out_features]
        out = sum(self.shards)
        self.weight = _empty(out, in_features)
        self.bias = _empty(out) if bias else None
        for p in (self.weight, self.bias):
            if p is not None:
                p.weight_loader, p.num_shards = self._load, len(self.shards)
        # LoRA slots, set by runtime/lora.py: A [slots, shards * R, in], B [slots, out, R], scale [slots]
        self.lora_a = self.lora_b = self.lora_scale = None

    def _load(self, param: nn.Parameter, tensor: torch.Tensor, shard: int = 0) -> None:
        start = sum(self.shards[:shard])
        param.data[start:start + self.shards[shard]].copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.linear(x, self.weight, self.bias)
        slots = get_lora_slots()
        # With slots, the branch runs whatever their values, so the decode CUDA graphs hold it.
        if self.lora_a is not None and slots is not None:
            ops.lora_expand(y, ops.lora_shrink(x, self.lora_a, slots), self.lora_b, self.lora_scale, slots,
                            self.shards)
        return y


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = _empty(num, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _empty(dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (and the attention scaling factor), computed exactly as HF transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


class Rotary(nn.Module):
    """cos/sin tables for every position up to max_positions, in fp32; the attention layers pick each token's
    rows."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq, attn_scale = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions).float(), inv_freq)
        self.register_buffer("cos", freqs.cos() * attn_scale, persistent=False)
        self.register_buffer("sin", freqs.sin() * attn_scale, persistent=False)


class Attention(nn.Module):
    """q/k norm, rotary, the KV cache write and attention over the paged KV cache, from the qkv projection's
    output. The runner points k_cache / v_cache at this layer's slices of the engine's one KV tensor."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache = self.v_cache = torch.tensor([])

    def forward(self, qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                rotary: "Rotary", positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return ops.qkv_attention(qkv, self.num_heads, self.num_kv_heads, q_weight, k_weight, eps, rotary.cos,
                                 rotary.sin, positions, self.k_cache, self.v_cache, meta, self.scale)
