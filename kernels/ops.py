"""The kernel entry points the model calls: Triton on the GPU, the plain-torch references elsewhere.

Backend names: "torch" (always the references), "triton" (always Triton; on CPU only under
TRITON_INTERPRET=1), "auto" (Triton for CUDA tensors, the references otherwise). The Triton modules are
imported on first use, so CPU-only processes never define Triton kernels (and tests can switch on the
interpreter before they are defined).
"""
import torch
import torch.nn.functional as F

from kvserve.kernels import reference as ref
from kvserve.kernels.metadata import AttentionMetadata

BACKENDS = ("torch", "triton", "auto")
_backend = "auto"


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


def _triton(x: torch.Tensor) -> bool:
    return _backend == "triton" or (_backend == "auto" and x.is_cuda)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, out: torch.Tensor | None = None,
                    workspace: torch.Tensor | None = None) -> torch.Tensor:
    """out / workspace: optional preallocated result and split-KV scratch (see attention.workspace_numel)."""
    head_dim = q.shape[-1]
    # The kernel tiles the head dim with tl.arange, which needs a power of two.
    if _triton(q) and head_dim >= 16 and head_dim & (head_dim - 1) == 0:
        from kvserve.kernels.attention import paged_attention
        return paged_attention(q, k_cache, v_cache, meta, scale, out=out, workspace=workspace)
    result = ref.paged_attention_ref(q, k_cache, v_cache, meta, scale)
    return result if out is None else out.copy_(result)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if _triton(x):
        from kvserve.kernels.norm import rms_norm
        return rms_norm(x, weight, eps, residual)
    return ref.rms_norm_ref(x, weight, eps, residual)


def qkv_prep(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, q_weight: torch.Tensor | None,
             k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
             positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> torch.Tensor:
    """q/k norm (when weights are given), rotary and the K/V cache write of a fused qkv output; returns q."""
    args = (qkv, num_q_heads, num_kv_heads, q_weight, k_weight, eps, cos, sin, positions, k_cache, v_cache,
            slot_mapping)
    if _triton(qkv):
        from kvserve.kernels.qkv_prep import qkv_prep
        return qkv_prep(*args)
    return ref.qkv_prep_ref(*args)


def qkv_attention(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, q_weight: torch.Tensor | None,
                  k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float) -> torch.Tensor:
    """qkv_prep then paged_attention: [T, (Hq + 2 Hkv) * D] -> [T, Hq, D]. On Triton, decode batches of few
    sequences (the split-KV path) run both in one kernel: there the prep's latency replaces a kernel boundary.
    With many programs (waves of them, each holding most of an SM's shared memory) it would stack up wave after
    wave ahead of each KV loop, and the separate kernel costs less (W1: 17.7k vs 23.8k tok/s, docs/PERF.md)."""
    head_dim = k_cache.shape[-1]
    if _triton(qkv) and meta.decode_only and head_dim >= 16 and head_dim & (head_dim - 1) == 0:
        from kvserve.kernels import attention
        if attention.num_splits_for(meta, num_kv_heads, k_cache.shape[1], qkv.device) > 1:
            # decode rows sit at the end of their contexts: the kernel takes their positions from seq_lens
            prep = attention.Prep(num_q_heads, q_weight, k_weight, eps, cos, sin, meta.slot_mapping)
            return attention.paged_attention(qkv, k_cache, v_cache, meta, scale, prep=prep)
    q = qkv_prep(qkv, num_q_heads, num_kv_heads, q_weight, k_weight, eps, cos, sin, positions, k_cache, v_cache,
                 meta.slot_mapping)
    return paged_attention(q, k_cache, v_cache, meta, scale)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           norm: tuple[torch.Tensor, float] | None = None, silu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(prologue(x), weight, bias) [+ residual], the prologue being rms_norm(x, *norm) or
    silu_and_mul(x) when asked. A single row (batch-1 decode) runs the Triton GEMV, which fuses all of it;
    otherwise the steps run one by one."""
    if x.shape[0] == 1 and _triton(x):
        from kvserve.kernels.gemv import gemv
        return gemv(x, weight, bias, norm, silu, residual)
    if norm is not None:
        x = rms_norm(x, *norm)
    if silu:
        x = silu_and_mul(x)
    y = F.linear(x, weight, bias)
    return y if residual is None else (y.float() + residual.float()).to(y.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _triton(x):
        from kvserve.kernels.activation import silu_and_mul
        return silu_and_mul(x)
    return ref.silu_and_mul_ref(x)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> [S, T, N] fp32 partial sums through each token's adapter slot (see kernels/lora.py)."""
    if _triton(x):
        from kvserve.kernels.lora import lora_shrink
        return lora_shrink(x, a, slots)
    return ref.lora_shrink_ref(x, a, slots)


def lora_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor,
                shards: list[int]) -> torch.Tensor:
    """Adds each token's adapter output to y [T, sum(shards)] in place."""
    if _triton(y):
        from kvserve.kernels.lora import lora_expand
        return lora_expand(y, h, b, scale, slots, shards)
    return ref.lora_expand_ref(y, h, b, scale, slots, shards)
