"""Workload W1 (docs: ../shared/DESIGN.md §6) on our engine and on HF transformers' continuous batching
(`generate_batch`, attn_implementation="paged|sdpa") in one invocation.

Prints our output tok/s, the peer's, their ratio, and our ratio to the W1 floor: the bytes the decode steps
must read (KV cache and weights) over the measured copy bandwidth.

    python bench/throughput.py [--num-requests 256] [--output-len 512] [--hf-requests 64]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (QWEN3_0_6B, W1_ENGINE, copy_bandwidth, dummy_llm, kv_bytes_per_token, param_count,  # noqa: E402
                    time_w1, w1_prompts)


def floor_seconds(prompts, output_len, cfg, bandwidth) -> float:
    kv = kv_bytes_per_token(cfg)
    kv_read = sum(kv * (len(p) * output_len + output_len * (output_len - 1) // 2) for p in prompts)
    weights_read = 2 * param_count(cfg) * output_len  # one pass of the weights per decode step
    return (kv_read + weights_read) / bandwidth


def run_ours(prompts, output_len, args) -> tuple[float, int]:
    llm = dummy_llm(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    max_model_len=W1_ENGINE["max_model_len"], gpu_memory_utilization=args.gpu_memory_utilization)
    result = time_w1(llm, prompts, output_len)
    del llm
    torch.cuda.empty_cache()
    return result


def run_hf(prompts, output_len) -> tuple[float, int]:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    cfg = dict(QWEN3_0_6B)
    config = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    config.eos_token_id = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="paged|sdpa")
    model = model.cuda().eval()
    gen = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=prompts[:4], generation_config=GenerationConfig(
        max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0))  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=gen)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    del model
    torch.cuda.empty_cache()
    return secs, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--hf-requests", type=int, default=64, help="requests for the peer (0: skip); its run is slow")
    ap.add_argument("--max-num-seqs", type=int, default=W1_ENGINE["max_num_seqs"])
    ap.add_argument("--max-num-batched-tokens", type=int, default=W1_ENGINE["max_num_batched_tokens"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=W1_ENGINE["gpu_memory_utilization"])
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench/throughput.py needs a CUDA device"
    prompts = w1_prompts(args.num_requests)
    bw = copy_bandwidth()
    floor = floor_seconds(prompts, args.output_len, QWEN3_0_6B, bw)
    floor_tps = args.num_requests * args.output_len / floor
    secs, tokens = run_ours(prompts, args.output_len, args)
    ours = tokens / secs
    result = dict(device=torch.cuda.get_device_name(), copy_bandwidth_tb_s=round(bw / 1e12, 3),
                  requests=args.num_requests, output_tokens=tokens, ours_s=round(secs, 2),
                  ours_tok_s=round(ours), floor_tok_s=round(floor_tps), ours_to_floor=round(ours / floor_tps, 3))
    print(f"ours: {tokens} tokens in {secs:.2f} s = {ours:,.0f} output tok/s "
          f"({ours / floor_tps:.1%} of the {floor_tps:,.0f} tok/s floor at {bw / 1e12:.2f} TB/s)", flush=True)
    if args.hf_requests:
        hf_prompts = prompts[:args.hf_requests]
        hsecs, htokens = run_hf(hf_prompts, args.output_len)
        hf = htokens / hsecs
        result.update(hf_requests=len(hf_prompts), hf_tokens=htokens, hf_s=round(hsecs, 2), hf_tok_s=round(hf),
                      ours_over_hf=round(ours / hf, 2))
        print(f"HF generate_batch (paged|sdpa), first {len(hf_prompts)} requests: {htokens} tokens in "
              f"{hsecs:.2f} s = {hf:,.0f} output tok/s; ours / HF = {ours / hf:.1f}x", flush=True)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
