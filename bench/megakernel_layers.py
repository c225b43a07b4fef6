"""Batch-1 decode layers as one persistent CUDA kernel that streams weights with bulk async copies
(bench/megakernel_layers.cu): the design the fourth session's note called for, measured (docs/PERF.md, fifth
session) and rejected.

    python bench/megakernel_layers.py [VARIANT ...]     # VARIANT: comma-separated defines, e.g. SYNC=1,STAGES=4

For each variant: the output's relative error after 28 layers against a float32 reference with the kernel's
bf16 roundings, and µs a layer (a CUDA graph of 4 launches x 28 layers, 20 replays) against the weight floor,
with the dependency waits (check=1, the real thing) and without them (check=0: wrong results, it shows what
the waits cost). The kernel is compiled at run time with NVRTC (torch.cuda._compile_kernel).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import copy_bandwidth  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megakernel_layers.cu")
L, HID, QO, INTER = 28, 1024, 2048, 3072
DEFAULT = ["MODE=1", "MODE=2", "SYNC=1", "SYNC=1,MODE=3", "SYNC=1,STAGES=12", "SYNC=0", "SYNC=2"]


def rbf(t):
    return t.bfloat16().float()


def make(dev):
    torch.manual_seed(0)

    def w(o, i):
        return (torch.randn(o, i, device=dev) * i**-0.5).to(torch.bfloat16)

    def ln():
        return (1 + 0.1 * torch.randn(HID, device=dev)).bfloat16()

    return [[w(4096, HID), w(HID, QO), w(2 * INTER, HID), w(HID, INTER), ln(), ln()] for _ in range(L)]


def reference(layers, x):
    def norm(h, wt):
        return rbf(h * torch.rsqrt(h.pow(2).mean() + 1e-6)) * wt.float()

    h = x.float()
    for wqkv, wo, wgu, wd, ln1, ln2 in layers:
        q = rbf(wqkv.float() @ norm(h, ln1))
        hm = rbf(h + rbf(wo.float() @ q[:QO]))
        gu = wgu.float() @ norm(hm, ln2)
        act = rbf(rbf(torch.nn.functional.silu(rbf(gu[:INTER]))) * rbf(gu[INTER:]))
        h = rbf(hm + rbf(wd.float() @ act))
    return h


def run_variant(variant, layers, x_in, expect, floor_us):
    defines = dict(kv.split("=") for kv in variant.split(",") if kv)
    stages, mode = int(defines.get("STAGES", 4)), int(defines.get("MODE", 0))
    kernel = torch.cuda._compile_kernel(open(SRC).read(), "mk_layers",
                                        nvcc_options=["-std=c++17"] + [f"-D{k}={v}" for k, v in defines.items()])
    smem = stages * 16384 + INTER * 4 + 64 * 4 + 8 * 4 + 8 * 4 + 2 * stages * 8  # ring + struct Smem
    kernel.set_shared_memory_config(smem)
    dev = x_in.device
    blocks = torch.cuda.get_device_properties(dev).multi_processor_count  # all resident: one block per SM
    ptrs = torch.tensor([t.data_ptr() for ly in layers for t in ly], dtype=torch.int64, device=dev)
    x_out = torch.zeros_like(x_in)
    hid, hmid, qkv, act = (torch.zeros(n, device=dev, dtype=torch.int32) for n in (HID, HID, 4096, INTER))
    epoch = torch.tensor([1, 0], device=dev, dtype=torch.int32)  # tags start above the buffers' zeros
    counters = torch.zeros(L * 4 * 32, device=dev, dtype=torch.int32)

    def launch(check):
        kernel(grid=(blocks, 1, 1), block=(288, 1, 1), shared_mem=smem,
               args=[ptrs, x_in, x_out, hid, hmid, qkv, act, epoch, counters, L, check])

    real = mode in (0, 3)  # MODE 1 and 2 publish nothing, so nothing can wait for them
    line = f"{variant or 'default'}:"
    if real:
        launch(1)
        torch.cuda.synchronize()
        err = ((x_out.float() - expect).norm() / expect.norm()).item()
        line += f" rel err {err:.1e};"
    for check in ((1, 0) if real else (0,)):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(4):
                launch(check)
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1e3 / (20 * 4 * L)
        line += f" check={check} {us:.2f} us a layer ({floor_us / us:.0%} of floor);"
    print(line, flush=True)


def main():
    dev = "cuda"
    layers = make(dev)
    x_in = torch.randn(HID, device=dev).bfloat16()
    expect = reference(layers, x_in)
    layer_bytes = sum(t.numel() * 2 for t in layers[0][:4])
    floor_us = layer_bytes / copy_bandwidth() * 1e6
    print(f"weights a layer {layer_bytes / 1e6:.2f} MB, floor {floor_us:.2f} us", flush=True)
    for variant in sys.argv[1:] or DEFAULT:
        try:
            run_variant(variant, layers, x_in, expect, floor_us)
        except Exception as e:  # a trapped kernel poisons the context: report and stop
            print(f"{variant}: failed {type(e).__name__}: {str(e)[-300:]}", flush=True)
            break


if __name__ == "__main__":
    main()
