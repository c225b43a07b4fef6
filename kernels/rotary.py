"""Neox-style (rotate-half) rotary embedding applied to q and k in one launch, in place or not."""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(x_ptr, o_ptr, stride_xh, stride_oh, num_heads, c, s,
            BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (j < HALF)
    x1 = tl.load(x_ptr + h * stride_xh + j, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + h * stride_xh + j + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + h * stride_oh + j, (x1 * c - x2 * s).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptr + h * stride_oh + j + HALF, (x2 * c + x1 * s).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                   stride_ct, stride_st, num_q_heads, num_k_heads,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    c = tl.load(cos_ptr + t * stride_ct + j, mask=j < HALF, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_st + j, mask=j < HALF, other=0.0).to(tl.float32)
    _rotate(q_ptr + t * stride_qt, qo_ptr + t * stride_qot, stride_qh, stride_qoh, num_q_heads, c, s,
            BLOCK_HQ, HALF, BLOCK_HALF)
    _rotate(k_ptr + t * stride_kt, ko_ptr + t * stride_kot, stride_kh, stride_koh, num_k_heads, c, s,
            BLOCK_HK, HALF, BLOCK_HALF)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hk, D] (views of a fused qkv are fine); cos, sin: [T, D // 2].
    Returns the rotated (q, k): the inputs themselves when inplace, else new tensors."""
    num_tokens, num_q_heads, head_dim = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1
    q_out, k_out = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q, k, q_out, k_out, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0), sin.stride(0),
            num_q_heads, k.shape[1], BLOCK_HQ=triton.next_power_of_2(num_q_heads),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]), HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            num_warps=4)
    return q_out, k_out
