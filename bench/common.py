"""Shared pieces of the GPU benchmarks: the W1 workload, the Qwen3-0.6B shape, and the copy bandwidth that
sets the physical floor."""
import json
import os
import random
import tempfile

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
