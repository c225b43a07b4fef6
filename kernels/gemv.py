"""y = [residual +] prologue(x) W^T (+ b) for a single row x: batch-1 decode's projections, with the layer's
small steps folded in -- RMSNorm of x before the qkv and gate/up projections, SiLU-and-mul before the down
projection, the residual add after the o and down projections -- so a layer is 4 projection kernels plus
attention (which also does qkv_prep's work) and its split merge: 6 kernels instead of 10.

At batch 1 a layer's weights (31 MB for Qwen3-0.6B) take ~10 µs to read, about what a few kernel launches
cost, so the time between kernels matters as much as the kernels. Each program therefore loads its first
weight tile *before* waiting for the previous kernel (programmatic dependent launch: weights do not depend on
it) and lets the next kernel launch at once, so one projection's weight reads overlap the previous kernels'
tails. On the H100, 28 layers of the four projections took 16.0 µs a layer this way against 19.8 for the
best plain GEMV and 25.2 for cuBLAS (docs/PERF.md).

PDL rule for every kernel launched with it (env.pdl): each program calls gdc_wait before it reads anything
an earlier kernel writes and before it writes anything; then, since each kernel only completes after its
predecessor did, any later kernel may read any earlier kernel's output.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kvserve.kernels.env import pdl

# Weight elements a program holds: one tile of up to MAX_BLOCK_K features for BLOCK_N = TILE // BLOCK_K rows.
TILE = 8192
MAX_BLOCK_K = 4096
NO_PROLOGUE, NORM, SILU = 0, 1, 2


@triton.jit
def _input(x_ptr, k, K, rstd, nw_ptr, PROLOGUE: tl.constexpr):
    """Features k of the projection's input in fp32, rounded where the unfused ops round."""
    k_ok = k < K
    dtype = x_ptr.dtype.element_ty
    if PROLOGUE == 2:  # SILU: x holds gate then up
        g = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + K + k, mask=k_ok, other=0.0).to(tl.float32)
        return ((g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * u).to(dtype).to(tl.float32)
    x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    if PROLOGUE == 1:  # NORM
        w = tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        x = (w * (x * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return x


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, nw_ptr, res_ptr, y_ptr, N, K, stride_w, eps,
                 PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rows = w_ptr + n.to(tl.int64)[:, None] * stride_w
    k = tl.arange(0, BLOCK_K)
    w = tl.load(rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
    if PDL:
        gdc_wait()
    rstd = 0.0
    if PROLOGUE == 1:
        sq = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + k0 + k, mask=k0 + k < K, other=0.0).to(tl.float32)
            sq += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(sq, 0) / K + eps)
    # Products accumulate elementwise in fp32 and are summed once at the end: no reduction inside the loop.
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _input(x_ptr, k0 + k, K, rstd, nw_ptr, PROLOGUE)
        acc += w.to(tl.float32) * x[None, :]
        nxt = k0 + BLOCK_K + k  # the next tile (none past the end) is in flight while this one is summed
        w = tl.load(rows + nxt[None, :], mask=n_ok[:, None] & (nxt < K)[None, :], other=0.0)
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the projection's output is rounded before the add, as in the unfused layer
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(res_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         norm: tuple[torch.Tensor, float] | None = None, silu: bool = False,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] (or [1, 2K] with silu) -> [1, N], weight [N, K]: same result as the unfused ops --
    F.linear(rms_norm(x, *norm) or silu_and_mul(x) or x, weight, bias) [+ residual]."""
    n, k = weight.shape
    assert not (norm and silu), "one prologue at most"
    assert x.shape == (1, 2 * k if silu else k) and weight.stride(-1) == 1
    x = x.contiguous()
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_k = min(triton.next_power_of_2(k), MAX_BLOCK_K)
    block_n = max(TILE // block_k, 1)
    use_pdl = pdl(x.device)
    nw, eps = norm if norm is not None else (weight, 0.0)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, nw, residual if residual is not None else x, y,
        n, k, weight.stride(0), eps,
        PROLOGUE=NORM if norm is not None else SILU if silu else NO_PROLOGUE, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k, PDL=use_pdl, num_warps=4,
        launch_pdl=use_pdl)
    return y
