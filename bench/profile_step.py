"""Where a step's time goes: the engine's phases timed with device syncs between them, on W1's shape (the first
requests of W1, a short decode). The host side without syncs: bench/profile_decode.py.

    python bench/profile_step.py [--num-requests 256] [--output-len 64]
"""
import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import W1_ENGINE, dummy_llm, w1_prompts  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    from kvserve import SamplingParams
    import kvserve.runtime.engine as engine_mod
    llm = dummy_llm(**W1_ENGINE)
    eng, runner = llm.engine, llm.engine.runner
    times = defaultdict(float)
    counts = defaultdict(int)
    calls = defaultdict(list)

    def timed(name, fn):
        def wrapper(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            r = fn(*a, **k)
            torch.cuda.synchronize()
            times[name] += time.perf_counter() - t
            counts[name] += 1
            calls[name].append(round((time.perf_counter() - t) * 1e3, 1))
            return r
        return wrapper

    prompts = w1_prompts(args.num_requests)
    p = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    # phase timings
    eng.scheduler.schedule = timed("schedule", eng.scheduler.schedule)
    runner.prepare = timed("prepare", runner.prepare)
    if runner.graphs is not None:
        runner.graphs.replay = timed("graph_replay(incl. staging)", runner.graphs.replay)
    runner._eager = timed("eager_forward", runner._eager)
    runner.model.logits = timed("lm_head", runner.model.logits)
    engine_mod.sample = timed("sample", engine_mod.sample)  # host-side sampling (logprobs, penalties)
    engine_mod.sample_tokens = timed("sample", engine_mod.sample_tokens)  # on the device (the W1 case)
    eng._append = timed("append(postprocess)", eng._append)
    step = timed("step(total)", eng.step)
    eng.step = step
    t = time.perf_counter()
    llm.generate(prompts, p)
    total = time.perf_counter() - t
    print(f"{args.num_requests} requests x {args.output_len} tokens: {total:.2f} s, {counts['step(total)']} steps")
    for k in sorted(times, key=times.get, reverse=True):
        print(f"  {k:32s} {times[k] * 1e3 / max(counts[k], 1):8.3f} ms/call  x{counts[k]:6d}  {times[k]:7.3f} s")
    print("eager step ms, in order:", calls["eager_forward"])
    llm.generate(prompts, p)  # again: compiled kernels only
    print("eager step ms, second run:", calls["eager_forward"][len(calls["eager_forward"]) // 2:])


def logits_variants():
    """lm_head alternatives at W1's decode shape (batch 256), timed with CUDA events."""
    import triton.testing
    h = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(151936, 1024, device="cuda", dtype=torch.bfloat16)
    for name, fn in [("linear bf16", lambda: torch.nn.functional.linear(h, w)),
                     ("linear bf16 + float", lambda: torch.nn.functional.linear(h, w).float()),
                     ("linear bf16 + argmax", lambda: torch.nn.functional.linear(h, w).argmax(-1))]:
        print(f"  {name:28s} {triton.testing.do_bench(fn, return_mode='median'):.3f} ms")


if __name__ == "__main__":
    main()
    logits_variants()
