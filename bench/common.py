"""Shared pieces of the GPU benchmarks: the W1 workload, the Qwen3-0.6B shape, and the copy bandwidth that
sets the physical floor."""
import json
import os
import random
import tempfile
import time

import torch

QWEN3_0_6B = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    intermediate_size=3072, tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1000000.0,
    rms_norm_eps=1e-6, torch_dtype="bfloat16", eos_token_id=151645, bos_token_id=None, hidden_act="silu",
    attention_bias=False)


def w1_prompts(num_requests: int = 256) -> list[list[int]]:
    """Workload W1 exactly as the design brief defines it."""
    rng = random.Random(0)
    prompts = []
    for _ in range(num_requests):
        n = rng.randint(100, 1024)
        prompts.append([rng.randrange(1000, 150000) for _ in range(n)])
    return prompts


def model_folder(cfg: dict = QWEN3_0_6B) -> str:
    """A folder with only config.json: the engine runs it with load_format='dummy' (random weights)."""
    folder = tempfile.mkdtemp(prefix="kvserve-bench-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return folder


# The engine settings of every W1 run (bench/throughput.py, bench/lora_throughput.py, bench/profile_step.py), so
# that their figures compare.
W1_ENGINE = dict(max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=2048, gpu_memory_utilization=0.85)


def dummy_llm(cfg: dict = QWEN3_0_6B, **engine_args):
    """An LLM on random weights of `cfg`'s shape, token ids in and out; bf16 and no prefix cache unless the
    engine arguments say otherwise."""
    from kvserve import LLM
    defaults = dict(load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", enable_prefix_caching=False)
    return LLM(model_folder(cfg), **(defaults | engine_args))


def time_w1(llm, prompts, output_len: int, loras=None) -> tuple[float, int]:
    """(seconds, output tokens) of `prompts` run to `output_len` tokens each, after a warm-up on the first 32 that
    keeps kernel compilation out of the timing."""
    from kvserve import SamplingParams
    llm.generate(prompts[:32], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                 lora_request=loras[:32] if loras else None)
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True),
                        lora_request=loras)
    torch.cuda.synchronize()
    return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)


def param_count(cfg: dict) -> int:
    h, i, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    d, hq, hk = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = h * d * (hq + 2 * hk) + hq * d * h + 3 * h * i + 2 * h + 2 * d
    return L * per_layer + v * h * (1 if cfg["tie_word_embeddings"] else 2) + h


def kv_bytes_per_token(cfg: dict, elem: int = 2) -> int:
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * elem


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    reps = 20
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    secs = start.elapsed_time(end) / 1e3 / reps
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / secs
