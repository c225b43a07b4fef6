"""W1 with LoRA: 8 rank-16 adapters on every linear layer, assigned round-robin, against the base model's W1
in the same invocation (issue: multi-LoRA throughput >= 80 % of base).

    python bench/lora_throughput.py [--num-requests 256] [--output-len 512] [--adapters 8] [--rank 16]
"""
import argparse
import json
import os
import sys
import subprocess
import tempfile

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from common import QWEN3_0_6B, W1_ENGINE, dummy_llm, time_w1, w1_prompts  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def module_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, d, i = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # (in, out)


def make_adapters(root: str, n: int, rank: int, cfg: dict) -> dict[str, str]:
    """PEFT-format adapters with random weights, one folder each under root."""
    shapes, gen = module_shapes(cfg), torch.Generator().manual_seed(0)
    paths = {}
    for a in range(n):
        folder = os.path.join(root, f"lora{a}")
        os.makedirs(folder, exist_ok=True)
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for m, (fan_in, fan_out) in shapes.items():
                part = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                key = f"base_model.model.model.layers.{layer}.{part}.{m}"
                tensors[f"{key}.lora_A.weight"] = (torch.rand(rank, fan_in, generator=gen) - 0.5) * 0.02
                tensors[f"{key}.lora_B.weight"] = (torch.rand(fan_out, rank, generator=gen) - 0.5) * 0.02
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
                  os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS,
                       "bias": "none", "task_type": "CAUSAL_LM"}, f)
        paths[f"lora{a}"] = folder
    return paths


def run(prompts, output_len, loras, args, adapters=None) -> float:
    extra = dict(max_loras=len(adapters), max_lora_rank=args.rank, lora_modules=adapters,
                 lora_allowed_roots=[args.root]) if adapters else {}
    llm = dummy_llm(**W1_ENGINE, **extra)
    secs, tokens = time_w1(llm, prompts, output_len, loras)
    del llm
    torch.cuda.empty_cache()
    return tokens / secs


def _child(args, which: str) -> float:
    cmd = [sys.executable, __file__, "--only", which, "--num-requests", str(args.num_requests),
           "--output-len", str(args.output_len), "--adapters", str(args.adapters), "--rank", str(args.rank)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("RATE ")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["base", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench/lora_throughput.py needs a CUDA device"
    args.root = tempfile.mkdtemp(prefix="kvserve-loras-")
    adapters = make_adapters(args.root, args.adapters, args.rank, QWEN3_0_6B)
    prompts = w1_prompts(args.num_requests)
    names = list(adapters)
    loras = [names[i % len(names)] for i in range(len(prompts))]
    if args.only == "base":
        print("RATE", run(prompts, args.output_len, None, args))
        return
    if args.only == "lora":
        print("RATE", run(prompts, args.output_len, loras, args, adapters))
        return
    # each engine in its own process: one engine sizes its KV pool from what the other left free
    base, lora = (_child(args, which) for which in ("base", "lora"))
    print(f"base W1: {base:,.0f} output tok/s", flush=True)
    print(f"W1 with {len(names)} rank-{args.rank} adapters (all linear layers, round-robin): {lora:,.0f} output tok/s "
          f"= {lora / base:.1%} of base", flush=True)
    print("RESULT " + json.dumps(dict(base_tok_s=round(base), lora_tok_s=round(lora), ratio=round(lora / base, 3),
                                      adapters=len(names), rank=args.rank)))


if __name__ == "__main__":
    main()
