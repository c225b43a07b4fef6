"""Multi-LoRA shrink and expand (Punica's split): every token picks its adapter through a per-token slot index,
so one launch serves a batch that mixes any adapters and the base model (slot -1).

    shrink: h[t] = x[t] @ A[slot[t]]^T                 x [T, K], A [L, S*R, K] -> h [T, S*R] fp32
    expand: y[t, shard s] += scale[slot[t]] * h[t, s*R:(s+1)*R] @ B[slot[t], shard s rows]^T

A fused module (q/k/v: 3 shards, gate/up: 2) stacks its shards' A matrices, so one shrink reads x once for all
of them; B holds the shards' output rows back to back. Ranks are zero-padded to R (a power of two >= 16, what
tl.dot needs). Programs tile BLOCK_T tokens and loop over the adapter slots present in their tile (the engine
orders each step's tokens by adapter, so that is one or two), so the grid, and with it a CUDA graph, depends
only on the token count. The shrink also splits the input features over programs (partial sums, added up
by the expand): a decode step's few tiles of tokens would otherwise leave most of the GPU idle.
"""
import torch
import triton
import triton.language as tl

from kvserve.kernels.env import dot_precision, interpreting

BLOCK_T = 16  # tokens per program: tl.dot's minimum rows
K_PER_SPLIT = 256  # shrink: input features per program, so a few tiles of tokens still fill the GPU


@triton.jit
def _slot_range(slots_ptr, rows, num_tokens):
    """The tile's slots and the lowest / highest adapter slot among them (lo > hi: base-model tokens only)."""
    slots = tl.load(slots_ptr + rows, mask=rows < num_tokens, other=-1)
    lo = tl.min(tl.where(slots >= 0, slots, 2147483647), axis=0)
    return slots, lo, tl.max(slots, axis=0)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, h_ptr, num_tokens, n, k, stride_x,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    slots, lo, hi = _slot_range(slots_ptr, rows, num_tokens)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    h_tile = h_ptr + (split * num_tokens + rows.to(tl.int64))[:, None] * n + cols[None, :]
    k_lo = split * K_PER_SPLIT
    # Tokens arrive ordered by adapter, so a tile holds one or two slots: visit only those.
    for slot in range(lo, hi + 1):
        mine = slots == slot
        if tl.max(mine.to(tl.int32), axis=0) > 0:
            a_base = a_ptr + slot * n * k  # fits in int32: asserted by the wrapper
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for k0 in range(k_lo, k_lo + K_PER_SPLIT, BLOCK_K):
                kk = k0 + ks
                x = tl.load(x_rows + kk[None, :], mask=mine[:, None] & (kk[None, :] < k), other=0.0)
                a = tl.load(a_base + cols[None, :] * k + kk[:, None], mask=(cols[None, :] < n) & (kk[:, None] < k),
                            other=0.0)  # [BLOCK_K, BLOCK_N]: A^T
                if UPCAST:  # the interpreter has no half-precision dot
                    x = x.to(tl.float32)
                    a = a.to(tl.float32)
                acc += tl.dot(x, a, input_precision=DOT_PRECISION)
            tl.store(h_tile, acc, mask=mine[:, None] & (cols[None, :] < n))


@triton.jit
def _expand_kernel(h_ptr, b_ptr, scale_ptr, slots_ptr, y_ptr, num_tokens, n, out, stride_y,
                   size0, size1, size2, num_splits,
                   R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    shard = tl.program_id(2)
    start = tl.where(shard == 0, 0, tl.where(shard == 1, size0, size0 + size1))
    size = tl.where(shard == 0, size0, tl.where(shard == 1, size1, size2))
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots, lo, hi = _slot_range(slots_ptr, rows, num_tokens)
    # the grid spans the widest shard; narrower shards leave trailing programs idle
    if (hi < 0) | (tl.program_id(1) * BLOCK_O >= size):
        return
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    col_ok = cols < size
    cols = start + cols
    rs = tl.arange(0, R)
    rows64 = rows.to(tl.int64)
    delta = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for slot in range(lo, hi + 1):
        mine = slots == slot
        if tl.max(mine.to(tl.int32), axis=0) > 0:
            h = tl.zeros((BLOCK_T, R), dtype=tl.float32)
            for split in range(0, num_splits):  # the shrink's partial sums over its input-feature splits
                h += tl.load(h_ptr + (split * num_tokens + rows64)[:, None] * n + shard * R + rs[None, :],
                             mask=mine[:, None], other=0.0)
            b = tl.load(b_ptr + slot * out * R + cols[None, :] * R + rs[:, None],
                        mask=col_ok[None, :], other=0.0)  # [R, BLOCK_O]: B^T
            # h rounds to the weights' dtype before the product, as a chain of two half-precision linears does
            h = h.to(b.dtype)
            if UPCAST:
                h = h.to(tl.float32)
                b = b.to(tl.float32)
            delta += tl.dot(h, b, input_precision=DOT_PRECISION) * tl.load(scale_ptr + slot)
    mask = (slots >= 0)[:, None] & col_ok[None, :]
    y_tile = y_ptr + rows64[:, None] * stride_y + cols[None, :]
    y = tl.load(y_tile, mask=mask, other=0.0)
    tl.store(y_tile, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x [T, K], a [L, N, K], slots [T] int32 -> h [S, T, N] fp32, partial sums over S splits of K (expand adds
    them up). Rows of base-model tokens are left undefined."""
    num_tokens, k = x.shape
    n = a.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    assert a.numel() < 2**31, "adapter slots too large for the kernel's int32 offsets"
    splits = triton.cdiv(k, K_PER_SPLIT)
    h = torch.empty(splits, num_tokens, n, dtype=torch.float32, device=x.device)
    if num_tokens:
        block_n = max(16, triton.next_power_of_2(n))
        block_k = 64 if block_n <= 128 else 32
        _shrink_kernel[(triton.cdiv(num_tokens, BLOCK_T), splits)](
            x, a, slots, h, num_tokens, n, k, x.stride(0), BLOCK_T=BLOCK_T, BLOCK_N=block_n, BLOCK_K=block_k,
            K_PER_SPLIT=K_PER_SPLIT, UPCAST=interpreting(),
            DOT_PRECISION=dot_precision(x.dtype), num_warps=4)
    return h


def lora_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor,
                shards: list[int]) -> torch.Tensor:
    """y [T, sum(shards)] += per-shard (sum of h's splits) @ B^T * scale, in place; h [S, T, N] fp32,
    b [L, sum(shards), R], scale [L] fp32."""
    num_tokens, out = y.shape
    rank = b.shape[2]
    assert 1 <= len(shards) <= 3 and sum(shards) == out and y.stride(-1) == 1
    assert b.numel() < 2**31, "adapter slots too large for the kernel's int32 offsets"
    if num_tokens:
        sizes = list(shards) + [0] * (3 - len(shards))
        block_o = 64
        grid = (triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(max(shards), block_o), len(shards))
        _expand_kernel[grid](
            h, b, scale, slots, y, num_tokens, h.shape[2], out, y.stride(0), *sizes, h.shape[0],
            R=rank, BLOCK_T=BLOCK_T, BLOCK_O=block_o, UPCAST=interpreting(),
            DOT_PRECISION=dot_precision(b.dtype), num_warps=4)
    return y
