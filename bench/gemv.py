"""Batch-1 decode's matrix-vector products: cuBLAS (F.linear) against a plain Triton GEMV over a sweep of tile
shapes, on Qwen3-0.6B's four projections. 28 distinct weight copies per shape (as the layers: no L2 reuse),
timed as a CUDA graph of 28 calls, so each figure includes the in-graph gap between kernels.

The GEMV is kernels/gemv.py's (the engine runs it for single rows, autotuned over this sweep's winners); the
sweep also says how close any one-kernel-per-projection decode can get to the weights-bandwidth floor
(docs/PERF.md).

    python bench/gemv.py               # from the repository root, with kvserve installed
"""
import itertools

import torch

from kvserve.kernels.gemv import _gemv_kernel

gemv = _gemv_kernel.fn  # the kernel itself, without the autotuner: the sweep sets the tiles


def time_graph(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        g.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps * 1e3  # us per graph


def main():
    shapes = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
    total_cublas = total_best = 0.0
    for name, (N, K) in shapes.items():
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(28)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        ys = [torch.empty(1, N, device="cuda", dtype=torch.bfloat16) for _ in range(28)]
        cublas = time_graph(lambda: [torch.nn.functional.linear(x, w, out=y) for w, y in zip(ws, ys)]) / 28
        ref = torch.nn.functional.linear(x, ws[0]).float()
        best = None
        for bn, bk, warps, stages in itertools.product([4, 8, 16], [128, 256, 512], [4, 8], [1, 3]):
            if bn * bk > 8192 or K % bk:
                continue
            def run():
                for w, y in zip(ws, ys):
                    gemv[(N // bn,)](x, w, w, y, N, K, K, HAS_BIAS=False, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                     num_stages=stages)
            try:
                t = time_graph(run) / 28
            except Exception as e:  # noqa: BLE001
                print("  skip", bn, bk, warps, stages, type(e).__name__)
                continue
            err = (ys[0].float() - ref).abs().max().item() / ref.abs().max().item()
            if best is None or t < best[0]:
                best = (t, bn, bk, warps, stages, err)
        gb = N * K * 2 / 1e9
        t, bn, bk, warps, stages, err = best
        print(f"{name:8s} N={N} K={K}: cuBLAS {cublas:6.2f} us ({gb / cublas * 1e6 / 1e3:.2f} TB/s), "
              f"Triton GEMV {t:6.2f} us ({gb / t * 1e6 / 1e3:.2f} TB/s) BLOCK_N={bn} BLOCK_K={bk} warps={warps} "
              f"stages={stages} rel_err={err:.1e}", flush=True)
        total_cublas += cublas
        total_best += t
    print(f"per layer: cuBLAS {total_cublas:.1f} us, Triton GEMV {total_best:.1f} us")


if __name__ == "__main__":
    main()
