"""KV offload: time to first token of a request whose long prefix (8k tokens) is restored from the CPU tier,
against recomputing it, on the Llama-3.1-8B and Qwen3-0.6B shapes (random weights, bf16); and the engine's own
load-or-recompute choice (policy "auto") for each.

For each shape: warm up at the full length (kernels, and the prefill-throughput estimate the choice uses), run
the prefix once so its chunks land in the CPU tier, then per repeat flush the GPU prefix cache and time a
request of prefix + a fresh suffix with the policy forced to "never" (recompute), "always" (restore) and left to
"auto". TTFT is the engine's own first_token_time - arrival_time; medians are printed.

    python bench/offload.py [--prefix-len 8192] [--suffix-len 32] [--repeats 3] [--shapes llama-3.1-8b qwen3-0.6b]
    python bench/offload.py --smoke     # a tiny shape and a short prefix, on whatever device there is
"""
import argparse
import gc
import json
import os
import random
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import QWEN3_0_6B, dummy_llm, kv_bytes_per_token  # noqa: E402

LLAMA_3_1_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
    tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=500000.0,
    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    rms_norm_eps=1e-5, torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128009, hidden_act="silu",
    attention_bias=False)
TINY = dict(LLAMA_3_1_8B, vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=128, rope_scaling=None)
SHAPES = {"llama-3.1-8b": LLAMA_3_1_8B, "qwen3-0.6b": QWEN3_0_6B}
TARGET = 3.0  # issue 6: restoring an 8k prefix on the Llama-3.1-8B shape is at least this much faster


def run_shape(name: str, cfg: dict, args) -> dict:
    cuda = torch.cuda.is_available()
    total = args.prefix_len + args.suffix_len
    llm = dummy_llm(cfg, enable_prefix_caching=True,  # restored chunks land in the prefix cache
                    dtype="bfloat16" if cuda else "float32", max_model_len=total + 16, max_num_batched_tokens=total,
                    max_num_seqs=8, gpu_memory_utilization=args.gpu_memory_utilization,
                    kv_offload_cpu_gb=args.cpu_gb, kv_offload_chunk_tokens=args.chunk_tokens,
                    **({} if cuda else {"num_gpu_blocks_override": 2 * (total // 16 + 2)}))
    result = measure(llm, name, cfg, args)
    del llm
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def measure(llm, name: str, cfg: dict, args) -> dict:
    from kvserve import SamplingParams

    cuda = torch.cuda.is_available()
    total = args.prefix_len + args.suffix_len
    engine, off = llm.engine, llm.engine.offload
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1000, min(100000, cfg["vocab_size"])) for _ in range(n)]

    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prefix = tokens(args.prefix_len)
    for _ in range(2):  # warm-up at full length, with other tokens: nothing of it is reused
        llm.generate(tokens(total), one)
    saved = engine.stats().kv_offload_chunks_saved.get("cpu", 0)
    llm.generate(prefix + tokens(args.suffix_len), one)  # its chunks go to the CPU tier as it finishes
    saved = engine.stats().kv_offload_chunks_saved.get("cpu", 0) - saved

    def timed(policy: str) -> tuple[float, int]:
        off.policy = policy
        engine.block_manager.reset_prefix_cache()
        before = engine.stats().kv_offload_tokens_restored
        if cuda:
            torch.cuda.synchronize()
        out = llm.generate(prefix + tokens(args.suffix_len), one)[0]
        return out.metrics.first_token_time - out.metrics.arrival_time, \
            engine.stats().kv_offload_tokens_restored - before

    runs = {p: [timed(p) for _ in range(args.repeats)] for p in ("never", "always", "auto")}
    ttft = {p: statistics.median(t for t, _ in r) for p, r in runs.items()}
    restored = runs["always"][-1][1]
    auto_loads = [n > 0 for _, n in runs["auto"]]
    chunks = restored // off.chunk_blocks // off.block_size
    est_load = chunks * off.load_estimate("cpu")
    est_recompute = restored * off.s_per_token if off.s_per_token else None
    result = dict(
        shape=name, prefix_tokens=args.prefix_len, suffix_tokens=args.suffix_len, chunks_saved=saved,
        tokens_restored=restored, chunk_mib=round(off.spec.nbytes / 2**20, 2),
        kv_mib=round(kv_bytes_per_token(cfg, off.kv.element_size()) * args.prefix_len / 2**20, 1),
        ttft_recompute_ms=round(ttft["never"] * 1e3, 2), ttft_restore_ms=round(ttft["always"] * 1e3, 2),
        speedup=round(ttft["never"] / ttft["always"], 2),
        auto_choice="load" if all(auto_loads) else "recompute" if not any(auto_loads) else "mixed",
        ttft_auto_ms=round(ttft["auto"] * 1e3, 2), est_load_ms=round(est_load * 1e3, 2),
        est_recompute_ms=round(est_recompute * 1e3, 2) if est_recompute is not None else None,
        host_to_cache_gb_s=round(off.copy_bw / 1e9, 1))
    print(f"{name}: {args.prefix_len}-token prefix, TTFT recompute {result['ttft_recompute_ms']} ms, restored "
          f"from CPU {result['ttft_restore_ms']} ms ({result['speedup']}x; {restored} tokens in {chunks} chunks of "
          f"{result['chunk_mib']} MiB); engine's choice: {result['auto_choice']} ({result['ttft_auto_ms']} ms; "
          f"estimates load {result['est_load_ms']} ms vs recompute {result['est_recompute_ms']} ms)", flush=True)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--prefix-len", type=int, default=8192)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-gb", type=float, default=4.0, help="CPU tier size (an 8k Llama-8B prefix is 1 GiB)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--smoke", action="store_true", help="a tiny shape and a 512-token prefix (checks the script)")
    args = ap.parse_args()
    if args.smoke:
        args.prefix_len, args.chunk_tokens, args.repeats = 512, 64, 1
        shapes = {"tiny": TINY}
    else:
        assert torch.cuda.is_available(), "bench/offload.py needs a CUDA device (or --smoke)"
        shapes = {s: SHAPES[s] for s in args.shapes}
    results = [run_shape(name, cfg, args) for name, cfg in shapes.items()]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for r in results:
        if r["shape"] == "llama-3.1-8b":
            print(f"target: restore >= {TARGET}x faster than recompute on llama-3.1-8b: "
                  f"{'PASS' if r['speedup'] >= TARGET else 'FAIL'} ({r['speedup']}x)", flush=True)
    print("RESULT " + json.dumps(dict(device=device, results=results)))


if __name__ == "__main__":
    main()
