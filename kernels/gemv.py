"""y = x W^T (+ b) for a single row x: batch-1 decode's projections.

cuBLAS runs these as tensor-core tiles of 64 output rows (the down projection as split-K plus a reduce
kernel); a plain CUDA-core loop over narrow row blocks keeps more of the GPU streaming weights. On the H100
the projections of a Qwen3-0.6B layer took 20.7 µs against cuBLAS's 25.2 (bench/gemv.py, docs/PERF.md). The
configurations are the winners of that sweep; autotuning picks one per weight shape on first use (the decode
graphs' warm-up runs, before capture).
"""
import torch
import triton
import triton.language as tl

from kvserve.kernels.env import interpreting


def _configs() -> list[triton.Config]:
    # (rows per program, features per step, warps, stages)
    winners = [(4, 512, 4, 1), (4, 128, 8, 3), (8, 512, 4, 3), (4, 128, 8, 1)]
    if interpreting():
        winners = winners[:1]  # the interpreter runs no autotuning
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in winners]


@triton.autotune(configs=_configs(), key=["N", "K"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rows = w_ptr + n.to(tl.int64)[:, None] * stride_w
    # Products accumulate elementwise in fp32 and are summed once at the end: no reduction inside the loop.
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K], weight [N, K] -> [1, N], same contract as F.linear for one row."""
    n, k = weight.shape
    assert x.shape == (1, k) and weight.stride(-1) == 1
    x = x.contiguous()
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_kernel[grid](x, weight, bias if bias is not None else weight, y, n, k, weight.stride(0),
                       HAS_BIAS=bias is not None)
    return y
