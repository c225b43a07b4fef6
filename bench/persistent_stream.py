"""The persistent-kernel alternative for batch-1 projections, measured (docs/PERF.md, fourth session).

One launch runs L layers x the four projections (qkv with RMSNorm, o + residual, gate/up with RMSNorm, down with
SiLU-and-mul + residual) of the Qwen3-0.6B shape: one program per SM streams its share of every projection's
rows through a 4-deep register queue of weight tiles that runs ahead across projections and layers (every
tile position is known at compile time), and the programs meet at a grid barrier between projections (an
arrival counter and a generation word). Attention is left out: this bounds what such a kernel could do.

    python bench/persistent_stream.py [programs_per_sm]

Prints µs a layer against the weight floor for each tile shape and barrier kind: "acq_rel" is the correct
barrier, "relaxed" (no ordering) and "none" (no barrier: wrong results) are diagnostics that split the cost
between the barriers and the weight stream itself.
"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from common import copy_bandwidth  # noqa: E402

# Memory orderings of the barrier's atomics: 0 the real barrier, 1 the diagnostic without ordering (may read
# stale data), 2 no barrier (unused).
SYNCS = [dict(ACQUIRE="acquire", RELEASE="release", ACQ_REL="acq_rel")] + [
    dict(ACQUIRE="relaxed", RELEASE="relaxed", ACQ_REL="relaxed")] * 2


@triton.jit
def _grid_sync(bar_ptr, NP: tl.constexpr, SYNC: tl.constexpr, ACQUIRE: tl.constexpr, RELEASE: tl.constexpr,
               ACQ_REL: tl.constexpr):
    """bar_ptr[0] counts arrivals, bar_ptr[1] is the generation the last arrival bumps. The orderings come from
    the host (SYNCS): acquire/release for the real barrier, all relaxed for the diagnostic."""
    if SYNC == 2:  # diagnostic: no barrier at all
        return
    tl.debug_barrier()
    gen = tl.atomic_add(bar_ptr + 1, 0, sem=ACQUIRE)
    arrived = tl.atomic_add(bar_ptr, 1, sem=ACQ_REL)
    if arrived == NP - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed")
        tl.atomic_add(bar_ptr + 1, 1, sem=RELEASE)
    else:
        while tl.atomic_add(bar_ptr + 1, 0, sem=ACQUIRE) == gen:
            pass
    tl.debug_barrier()


@triton.jit
def _wtile(ptr, layer, pid, i: tl.constexpr, j: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
           NP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, L: tl.constexpr):
    R: tl.constexpr = (N + NP - 1) // NP
    r = i * BN + tl.arange(0, BN)
    rows = pid * R + r
    ok = (r < R) & (rows < N) & (rows * 0 + layer < L)
    off = (rows * 0 + layer).to(tl.int64) * (N * K) + rows.to(tl.int64) * K + j * BK
    return tl.load(ptr + off[:, None] + tl.arange(0, BK)[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _stream_tile(wq, wo, wgu, wd, layer, pid, S: tl.constexpr,
                 N0: tl.constexpr, K0: tl.constexpr, N1: tl.constexpr, K1: tl.constexpr,
                 N2: tl.constexpr, K2: tl.constexpr, N3: tl.constexpr, K3: tl.constexpr,
                 T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, T3: tl.constexpr,
                 NP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, L: tl.constexpr):
    """Tile S of this program's weight stream, counted from the start of `layer` (S may run into the next);
    T0..T3: the program's tiles in each projection."""
    TL: tl.constexpr = T0 + T1 + T2 + T3
    U: tl.constexpr = S % TL
    layer = layer + S // TL
    if U < T0:
        return _wtile(wq, layer, pid, U // (K0 // BK), U % (K0 // BK), N0, K0, NP, BN, BK, L)
    elif U < T0 + T1:
        return _wtile(wo, layer, pid, (U - T0) // (K1 // BK), (U - T0) % (K1 // BK), N1, K1, NP, BN, BK, L)
    elif U < T0 + T1 + T2:
        return _wtile(wgu, layer, pid, (U - T0 - T1) // (K2 // BK), (U - T0 - T1) % (K2 // BK), N2, K2, NP, BN, BK, L)
    else:
        return _wtile(wd, layer, pid, (U - T0 - T1 - T2) // (K3 // BK), (U - T0 - T1 - T2) % (K3 // BK), N3, K3,
                      NP, BN, BK, L)


@triton.jit
def _x_norm(x_ptr, nw_ptr, K: tl.constexpr, eps):
    k = tl.arange(0, K)
    x = tl.load(x_ptr + k, cache_modifier=".cg").to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / K + eps)
    w = tl.load(nw_ptr + k).to(tl.float32)
    return (w * (x * rstd).to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16).to(tl.float32)


@triton.jit
def _stream_kernel(wq, wo, wgu, wd, ln1, ln2, h_ptr, h2_ptr, qkv_ptr, gu_ptr, bar_ptr, eps,
                   N0: tl.constexpr, K0: tl.constexpr, N1: tl.constexpr, K1: tl.constexpr,
                   N2: tl.constexpr, K2: tl.constexpr, N3: tl.constexpr, K3: tl.constexpr,
                   NP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, L: tl.constexpr,
                   SYNC: tl.constexpr, ACQUIRE: tl.constexpr, RELEASE: tl.constexpr,
                   ACQ_REL: tl.constexpr):
    pid = tl.program_id(0)
    R0: tl.constexpr = (N0 + NP - 1) // NP
    R1: tl.constexpr = (N1 + NP - 1) // NP
    R2: tl.constexpr = (N2 + NP - 1) // NP
    R3: tl.constexpr = (N3 + NP - 1) // NP
    RC0: tl.constexpr = (R0 + BN - 1) // BN
    RC1: tl.constexpr = (R1 + BN - 1) // BN
    RC2: tl.constexpr = (R2 + BN - 1) // BN
    RC3: tl.constexpr = (R3 + BN - 1) // BN
    T0: tl.constexpr = RC0 * (K0 // BK)
    T1: tl.constexpr = RC1 * (K1 // BK)
    T2: tl.constexpr = RC2 * (K2 // BK)
    T3: tl.constexpr = RC3 * (K3 // BK)
    zero = pid * 0
    w0 = _stream_tile(wq, wo, wgu, wd, zero, pid, 0, N0, K0, N1, K1, N2, K2, N3, K3, T0, T1, T2, T3, NP, BN, BK, L)
    w1 = _stream_tile(wq, wo, wgu, wd, zero, pid, 1, N0, K0, N1, K1, N2, K2, N3, K3, T0, T1, T2, T3, NP, BN, BK, L)
    w2 = _stream_tile(wq, wo, wgu, wd, zero, pid, 2, N0, K0, N1, K1, N2, K2, N3, K3, T0, T1, T2, T3, NP, BN, BK, L)
    w3 = _stream_tile(wq, wo, wgu, wd, zero, pid, 3, N0, K0, N1, K1, N2, K2, N3, K3, T0, T1, T2, T3, NP, BN, BK, L)
    k = tl.arange(0, BK)
    for layer in range(L):
        # phase 0: qkv = W_qkv norm(h)
        if layer > 0:
            _grid_sync(bar_ptr, NP, SYNC, ACQUIRE, RELEASE, ACQ_REL)
        x = _x_norm(h_ptr, ln1 + layer * K0, K0, eps)
        for i in tl.static_range(RC0):
            y = tl.sum(w0.to(tl.float32) * x[None, :], 1)
            rows = pid * R0 + i * BN + tl.arange(0, BN)
            ok = (i * BN + tl.arange(0, BN) < R0) & (rows < N0)
            tl.store(qkv_ptr + rows, y.to(tl.bfloat16), mask=ok)
            w0, w1, w2, w3 = w1, w2, w3, _stream_tile(wq, wo, wgu, wd, layer, pid, i + 4, N0, K0, N1, K1, N2, K2,
                                                      N3, K3, T0, T1, T2, T3, NP, BN, BK, L)
        _grid_sync(bar_ptr, NP, SYNC, ACQUIRE, RELEASE, ACQ_REL)
        # phase 1: h2 = h + W_o qkv[:K1]
        for i in tl.static_range(RC1):
            acc = tl.zeros([BN], tl.float32)
            for j in tl.static_range(K1 // BK):
                x = tl.load(qkv_ptr + j * BK + k, cache_modifier=".cg").to(tl.float32)
                acc += tl.sum(w0.to(tl.float32) * x[None, :], 1)
                w0, w1, w2, w3 = w1, w2, w3, _stream_tile(wq, wo, wgu, wd, layer, pid, T0 + i * (K1 // BK) + j + 4,
                                                          N0, K0, N1, K1, N2, K2, N3, K3, T0, T1, T2, T3, NP, BN, BK, L)
            rows = pid * R1 + i * BN + tl.arange(0, BN)
            ok = (i * BN + tl.arange(0, BN) < R1) & (rows < N1)
            res = tl.load(h_ptr + rows, mask=ok, cache_modifier=".cg").to(tl.float32)
            tl.store(h2_ptr + rows, (acc.to(tl.bfloat16).to(tl.float32) + res).to(tl.bfloat16), mask=ok)
        _grid_sync(bar_ptr, NP, SYNC, ACQUIRE, RELEASE, ACQ_REL)
        # phase 2: gu = W_gu norm(h2)
        x = _x_norm(h2_ptr, ln2 + layer * K2, K2, eps)
        for i in tl.static_range(RC2):
            y = tl.sum(w0.to(tl.float32) * x[None, :], 1)
            rows = pid * R2 + i * BN + tl.arange(0, BN)
            ok = (i * BN + tl.arange(0, BN) < R2) & (rows < N2)
            tl.store(gu_ptr + rows, y.to(tl.bfloat16), mask=ok)
            w0, w1, w2, w3 = w1, w2, w3, _stream_tile(wq, wo, wgu, wd, layer, pid, T0 + T1 + i + 4, N0, K0, N1, K1,
                                                      N2, K2, N3, K3, T0, T1, T2, T3, NP, BN, BK, L)
        _grid_sync(bar_ptr, NP, SYNC, ACQUIRE, RELEASE, ACQ_REL)
        # phase 3: h = h2 + W_d silu(g) u
        for i in tl.static_range(RC3):
            acc = tl.zeros([BN], tl.float32)
            for j in tl.static_range(K3 // BK):
                g = tl.load(gu_ptr + j * BK + k, cache_modifier=".cg").to(tl.float32)
                u = tl.load(gu_ptr + K3 + j * BK + k, cache_modifier=".cg").to(tl.float32)
                x = ((g / (1.0 + tl.exp(-g))).to(tl.bfloat16).to(tl.float32) * u).to(tl.bfloat16).to(tl.float32)
                acc += tl.sum(w0.to(tl.float32) * x[None, :], 1)
                w0, w1, w2, w3 = w1, w2, w3, _stream_tile(wq, wo, wgu, wd, layer, pid,
                                                          T0 + T1 + T2 + i * (K3 // BK) + j + 4,
                                                          N0, K0, N1, K1, N2, K2, N3, K3, T0, T1, T2, T3, NP, BN, BK, L)
            rows = pid * R3 + i * BN + tl.arange(0, BN)
            ok = (i * BN + tl.arange(0, BN) < R3) & (rows < N3)
            res = tl.load(h2_ptr + rows, mask=ok, cache_modifier=".cg").to(tl.float32)
            tl.store(h_ptr + rows, (acc.to(tl.bfloat16).to(tl.float32) + res).to(tl.bfloat16), mask=ok)


def run_config(ws, lns, h0, np_run, bn, nw, extra, interpret=False):
    dev = h0.device
    wq, wo, wgu, wd = ws
    L = wq.shape[0]
    shapes = [tuple(w.shape[1:]) for w in ws]
    h = h0.clone()
    h2 = torch.empty_like(h)
    qkv = torch.empty(shapes[0][0], device=dev, dtype=torch.bfloat16)
    gu = torch.empty(shapes[2][0], device=dev, dtype=torch.bfloat16)
    bar = torch.zeros(2, dtype=torch.int32, device=dev)
    bk = min(1024, shapes[0][1], shapes[1][1], shapes[3][1])

    def run():
        h.copy_(h0)
        _stream_kernel[(np_run,)](wq, wo, wgu, wd, lns[0], lns[1], h, h2, qkv, gu, bar, 1e-6,
                                  *[d for s in shapes for d in s], NP=np_run, BN=bn, BK=bk, L=L,
                                  SYNC=extra, **SYNCS[extra], num_warps=nw)
    return run, h


def reference(ws, lns, h0):
    wq, wo, wgu, wd = [w.float() for w in ws]
    I = wd.shape[2]
    o_in = wo.shape[2]

    def norm(x, w):
        return (w.float() * (x * torch.rsqrt((x * x).mean() + 1e-6)).bfloat16().float()).bfloat16().float()
    h = h0.float()
    for l in range(wq.shape[0]):
        qkv = (norm(h, lns[0][l]) @ wq[l].T).bfloat16().float()
        h2 = ((qkv[:o_in] @ wo[l].T).bfloat16().float() + h).bfloat16().float()
        gu = (norm(h2, lns[1][l]) @ wgu[l].T).bfloat16().float()
        x = (torch.nn.functional.silu(gu[:I]).bfloat16().float() * gu[I:]).bfloat16().float()
        h = ((x @ wd[l].T).bfloat16().float() + h2).bfloat16().float()
    return h


def make(L, H, Q, O, I, dev):
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(Q, H), (H, O), (2 * I, H), (H, I)]
    ws = [(torch.randn(L, n, k, generator=g) / k ** 0.5).bfloat16().to(dev) for n, k in shapes]
    lns = [(1 + 0.1 * torch.randn(L, H, generator=g)).bfloat16().to(dev) for _ in range(2)]
    h0 = torch.randn(H, generator=g).bfloat16().to(dev)
    return ws, lns, h0


def main():
    dev = "cuda"
    ws, lns, h0 = make(28, 1024, 4096, 2048, 3072, dev)
    expect = reference(ws, lns, h0)
    np_ = torch.cuda.get_device_properties(0).multi_processor_count
    floor_us = sum(w.numel() * 2 for w in ws) / copy_bandwidth() * 1e6 / 28
    print(f"floor {floor_us:.2f} us/layer, {np_} SMs", flush=True)
    mult = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    for bn, nw in [(8, 8), (8, 16), (16, 16)]:
        for extra in [0, 1, 2]:  # acq_rel, relaxed, none
            try:
                run, h = run_config(ws, lns, h0, np_ * mult, bn, nw, extra)
                run()
                torch.cuda.synchronize()
                err = ((h.float() - expect).norm() / expect.norm()).item()
                ms = triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")
                sync = ("acq_rel", "relaxed", "none")[extra]
                print(f"NP={np_ * mult} BN={bn} warps={nw} sync={sync}: {ms * 1e3 / 28:.2f} us/layer "
                      f"({floor_us / (ms * 1e3 / 28):.0%} of floor), rel err {err:.1e}", flush=True)
            except Exception as e:
                print(f"BN={bn} warps={nw}: failed {type(e).__name__}: {str(e)[-400:]}", flush=True)


if __name__ == "__main__":
    main()
