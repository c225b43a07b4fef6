"""The CUDA path (Triton kernels, CUDA graphs, GPU sampling) against the CPU reference path."""
import random

import pytest
import torch

from kvserve import LLM, SamplingParams
from tiny_models import random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _fp32_gap(folder, ids) -> float:
    """HF fp32 gap between the top two logits after `ids`."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        top = hf(torch.tensor([ids])).logits[0, -1].topk(2).values
    return float(top[0] - top[1]), float(top[0].abs())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_greedy_matches_cpu_reference(tiny_model, kind, dtype):
    folder = tiny_model(kind)
    prompts = random_prompts(16, seed=5, hi=120)
    common = dict(block_size=16, max_num_batched_tokens=64, max_model_len=512, enable_prefix_caching=True)
    cpu = LLM(folder, device="cpu", dtype="float32", **common).generate(prompts, GREEDY)
    gpu_llm = LLM(folder, device="cuda", dtype=dtype, num_gpu_blocks_override=64, **common)
    assert gpu_llm.engine.runner.graphs is not None  # decode steps replay CUDA graphs
    gpu = gpu_llm.generate(prompts, GREEDY)
    diverged = 0
    for p, a, b in zip(prompts, cpu, gpu):
        x, y = a.outputs[0].token_ids, b.outputs[0].token_ids
        if x == y:
            continue
        diverged += 1
        i = next(j for j, (u, v) in enumerate(zip(x, y)) if u != v)
        gap, scale = _fp32_gap(folder, p + x[:i])
        # fp32 on both sides: only an exact tie may differ; bf16: a near-tie within bf16's resolution
        limit = 1e-4 * max(1.0, scale) if dtype == "float32" else 0.03 * max(1.0, scale)
        assert gap <= limit, f"{kind}/{dtype}: diverged at token {i} with fp32 logit gap {gap:.4f}"
    if dtype == "float32":
        assert diverged == 0


def test_gpu_seeded_sampling_matches_cpu(tiny_model):
    folder = tiny_model("qwen3")
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=11, max_tokens=16, ignore_eos=True)
    cpu = LLM(folder, device="cpu", dtype="float32").generate([[1, 2, 3, 4]], p)[0].outputs[0].token_ids
    gpu = LLM(folder, device="cuda", dtype="float32", num_gpu_blocks_override=32).generate([[1, 2, 3, 4]], p)
    assert gpu[0].outputs[0].token_ids == cpu


def test_gpu_long_contexts_match_cpu(tiny_model):
    # Decode graphs with contexts up to ~4,000 tokens (split-KV attention), alone and batched (fp32: exact).
    folder = tiny_model("qwen3")
    rng = random.Random(9)
    prompts = [[rng.randrange(1, 384) for _ in range(n)] for n in (100, 2100, 4000)]
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    common = dict(block_size=16, max_model_len=4096 + 16, enable_prefix_caching=False)
    cpu = [o.outputs[0].token_ids for o in LLM(folder, device="cpu", dtype="float32", **common).generate(prompts, p)]
    gpu_llm = LLM(folder, device="cuda", dtype="float32", num_gpu_blocks_override=1024, **common)
    alone = [gpu_llm.generate(q, p)[0].outputs[0].token_ids for q in prompts]
    together = [o.outputs[0].token_ids for o in gpu_llm.generate(prompts, p)]
    assert alone == cpu and together == cpu


def test_gpu_lora_batch_matches_cpu(tiny_model, tmp_path):
    # The decode graphs take each row's adapter slot from the step's packed input copy; with pipelined steps a
    # row must never run another step's adapter. Three adapters and the base, mixed, fp32: as on the CPU.
    from tiny_models import write_adapter
    base = tiny_model("qwen3")
    adapters = {f"a{i}": write_adapter(base, tmp_path / f"a{i}", seed=i) for i in range(3)}
    prompts = random_prompts(8, seed=3, hi=120)
    loras = [None, "a0", "a1", "a2", "a0", None, "a2", "a1"]
    common = dict(block_size=16, max_model_len=512, max_loras=3, lora_modules=adapters,
                  lora_allowed_roots=[str(tmp_path)])
    cpu = LLM(base, device="cpu", dtype="float32", **common).generate(prompts, GREEDY, lora_request=loras)
    gpu_llm = LLM(base, device="cuda", dtype="float32", num_gpu_blocks_override=128, **common)
    assert gpu_llm.engine.runner.graphs.lora_slots is not None
    gpu = gpu_llm.generate(prompts, GREEDY, lora_request=loras)
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]
    assert len({tuple(o.outputs[0].token_ids) for o in cpu}) == 8  # the adapters do change the outputs
