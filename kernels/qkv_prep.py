"""Everything between the qkv projection and attention in one launch: per-head q/k RMSNorm (Qwen3), neox rotary
embedding at each token's position, and the write of the new K/V into their cache slots.

Unfused this is six kernels a layer (q norm, k norm, two cos/sin gathers, rotary, KV store), each a few
microseconds of fixed cost: at small batches they took longer than the layer's weight reads (docs/PERF.md).
One program handles one token: all of its heads at once, reading the fused qkv row once.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kvserve.kernels.env import pdl


@triton.jit
def _norm_rotate(x_ptr, heads, w_ptr, c, s, eps,
                 HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """[BLOCK_H, BLOCK_HALF] halves of `heads` consecutive heads at x_ptr, normalised and rotated (fp32)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < heads) & (j < HALF)
    x1 = tl.load(x_ptr + h * (2 * HALF) + j, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + h * (2 * HALF) + HALF + j, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if HAS_NORM:
        # Rounded where the reference rounds: the normalised value, then its product with the weight.
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + j, mask=j < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
        x1 = (w1 * (x1 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s, h, j, mask


@triton.jit
def _qkv_prep_kernel(qkv_ptr, q_out_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr,
                     k_cache_ptr, v_cache_ptr, stride_t, stride_cos, stride_cb, stride_cs, stride_ch,
                     num_q_heads, num_kv_heads, eps,
                     HAS_NORM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, HALF: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # see kernels/gemv.py: nothing to load before the previous kernel is done
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    head_dim = 2 * HALF
    row = qkv_ptr + t * stride_t
    pos = tl.load(pos_ptr + t)
    jc = tl.arange(0, BLOCK_HALF)
    c = tl.load(cos_ptr + pos * stride_cos + jc, mask=jc < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + jc, mask=jc < HALF, other=0.0).to(tl.float32)[None, :]

    q1, q2, h, j, mask = _norm_rotate(row, num_q_heads, q_w_ptr, c, s, eps, HAS_NORM, BLOCK_HQ, HALF, BLOCK_HALF)
    q_dst = q_out_ptr + t * num_q_heads * head_dim + h * head_dim + j
    tl.store(q_dst, q1.to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(q_dst + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=mask)

    slot = tl.load(slot_ptr + t)
    if slot < 0:  # padding rows of a captured batch write no KV
        return
    k_row = row + num_q_heads * head_dim
    k1, k2, h, j, mask = _norm_rotate(k_row, num_kv_heads, k_w_ptr, c, s, eps, HAS_NORM, BLOCK_HK, HALF,
                                      BLOCK_HALF)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + h * stride_ch + j
    tl.store(k_cache_ptr + dst, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(k_cache_ptr + dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v_row = k_row + num_kv_heads * head_dim
    v1 = tl.load(v_row + h * head_dim + j, mask=mask)
    v2 = tl.load(v_row + h * head_dim + HALF + j, mask=mask)
    tl.store(v_cache_ptr + dst, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


def qkv_prep(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, q_weight: torch.Tensor | None,
             k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
             positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> torch.Tensor:
    """Same contract as reference.qkv_prep_ref: returns q [T, Hq, D]; K/V land in the caches."""
    num_tokens = qkv.shape[0]
    head_dim = cos.shape[1] * 2
    assert qkv.stride(-1) == 1 and cos.stride() == sin.stride() and cos.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    q = torch.empty(num_tokens, num_q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens:
        half = head_dim // 2
        has_norm = q_weight is not None
        use_pdl = pdl(qkv.device)
        _qkv_prep_kernel[(num_tokens,)](
            qkv, q, q_weight if has_norm else qkv, k_weight if has_norm else qkv, cos, sin, positions, slot_mapping,
            k_cache, v_cache, qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            num_q_heads, num_kv_heads, eps,
            HAS_NORM=has_norm, BLOCK_HQ=triton.next_power_of_2(num_q_heads),
            BLOCK_HK=triton.next_power_of_2(num_kv_heads), HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_SIZE=k_cache.shape[1], PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return q
