"""Batch-1 decode speed against the weights-bandwidth floor (every decode step reads all weights once).

    python bench/latency.py [--prompt-len 128] [--output-len 512]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import QWEN3_0_6B, copy_bandwidth, dummy_llm, kv_bytes_per_token, param_count  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=512)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench/latency.py needs a CUDA device"
    from kvserve import SamplingParams
    bw = copy_bandwidth()
    llm = dummy_llm(max_model_len=4096, max_num_seqs=8, gpu_memory_utilization=0.5)
    prompt = list(range(1000, 1000 + args.prompt_len))
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True))
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    decode_tps = (args.output_len - 1) / (total - ttft)
    weights = 2 * param_count(QWEN3_0_6B)
    avg_ctx = args.prompt_len + args.output_len / 2
    floor_step = (weights + kv_bytes_per_token(QWEN3_0_6B) * avg_ctx) / bw
    floor_tps = 1 / floor_step
    print(f"batch-1 decode: {decode_tps:,.0f} tok/s ({1e3 / decode_tps:.3f} ms/token); floor {floor_tps:,.0f} tok/s "
          f"({weights / 1e9:.2f} GB of weights at {bw / 1e12:.2f} TB/s) -> {decode_tps / floor_tps:.1%} of floor; "
          f"prefill of {args.prompt_len} tokens + first token: {ttft * 1e3:.1f} ms", flush=True)
    print("RESULT " + json.dumps(dict(decode_tok_s=round(decode_tps), floor_tok_s=round(floor_tps),
                                      ratio=round(decode_tps / floor_tps, 3), ttft_ms=round(ttft * 1e3, 2))))


if __name__ == "__main__":
    main()
