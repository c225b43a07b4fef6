"""Where a decode step's device time goes: the kernels of steady decode steps at a given batch size, from the
CUDA profiler, per step, against the wall time per step (the gap is host time the device waits through).

    python bench/profile_decode.py [--batch 1] [--prompt-len 128] [--steps 64] [--lora 0]

--lora N: N rank-16 adapters on every linear layer (as bench/lora_throughput.py), assigned round-robin.
Kernels launched with programmatic dependent launch start before their predecessor ends and wait inside, so
their profiled durations overlap; KVSERVE_PDL=0 turns it off to see each kernel's own time.
"""
import argparse
import os
import re
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import dummy_llm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--lora", type=int, default=0)
    args = ap.parse_args()
    extra, names = {}, None
    if args.lora:
        import tempfile
        from lora_throughput import make_adapters
        from common import QWEN3_0_6B
        root = tempfile.mkdtemp(prefix="kvserve-loras-")
        adapters = make_adapters(root, args.lora, 16, QWEN3_0_6B)
        names = list(adapters)
        extra = dict(max_loras=args.lora, max_lora_rank=16, lora_modules=adapters, lora_allowed_roots=[root])
    from kvserve import SamplingParams
    from torch.profiler import ProfilerActivity, profile
    llm = dummy_llm(max_model_len=4096, max_num_seqs=max(args.batch), gpu_memory_utilization=0.5, **extra)
    for b in args.batch:
        prompts = [list(range(1000 + i, 1000 + i + args.prompt_len)) for i in range(b)]
        loras = [names[i % len(names)] for i in range(b)] if names else None
        warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        llm.generate(prompts, warm, lora_request=loras)
        params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompts, params, lora_request=loras)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, params, lora_request=loras)
            torch.cuda.synchronize()
        per_name = defaultdict(lambda: [0, 0.0])
        busy = 0.0
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                us = e.device_time if hasattr(e, "device_time") else e.cuda_time
                per_name[e.name][0] += 1
                per_name[e.name][1] += us
                busy += us
        steps = args.steps
        print(f"batch {b}{f', {args.lora} adapters' if names else ''}: wall {wall / steps * 1e6:.0f} us/step (incl. prefill), device busy "
              f"{busy / steps:.0f} us/step, {sum(c for c, _ in per_name.values()) / steps:.0f} kernels/step")
        for name, (count, us) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[:25]:
            print(f"  {us / steps:8.1f} us/step  {count / steps:6.1f}/step  {us / count:7.2f} us each  {name[:90]}")
        host_profile(llm, prompts, params, loras, steps)


def host_profile(llm, prompts, params, loras, steps):
    """The host's time per step, and how much of it is spent waiting for the device (reading tokens back)."""
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t = time.perf_counter()
    prof.enable()
    llm.generate(prompts, params, lora_request=loras)
    prof.disable()
    wall = time.perf_counter() - t
    stats = pstats.Stats(prof)
    # cProfile names C functions "<function Event.synchronize at 0x...>", "<method 'tolist' of ...>"
    waits = re.compile(r"\bsynchronize\b|'tolist'|'item'")
    wait = sum(v[2] for k, v in stats.stats.items() if waits.search(k[2]))
    print(f"host: {wall / steps * 1e6:.0f} us/step under cProfile, of which waiting for the device "
          f"{wait / steps * 1e6:.0f} us/step; busiest functions:")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    print("\n".join(out.getvalue().splitlines()[-22:]))


if __name__ == "__main__":
    main()
