"""Greedy outputs and logprobs against HF transformers on the same random weights."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from kvserve import LLM, SamplingParams
from tiny_models import explain_divergence, random_prompts

KINDS = ["llama", "qwen2", "qwen3", "mistral"]


def _hf(folder):
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None  # like ignore_eos: EOS is an ordinary token
    return hf


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_hf_with_preemption_and_chunked_prefill(tiny_model, kind):
    folder = tiny_model(kind)
    prompts = random_prompts(16, seed=1, hi=48)
    budget = 20
    assert max(map(len, prompts)) > budget  # chunked prefill is exercised
    llm = LLM(folder, num_gpu_blocks_override=24, block_size=4, max_num_batched_tokens=budget,
              max_num_seqs=8, max_model_len=96)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0  # the pool is small enough to preempt
    assert llm.engine.block_manager.num_free == 24
    hf = _hf(folder)
    for prompt, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
        got = out.outputs[0].token_ids
        assert len(got) == 12 and out.outputs[0].finish_reason == "length"
        if ref.tolist() != got:
            explain_divergence(hf, prompt, ref.tolist(), got)


def test_logprobs_match_hf_log_softmax(tiny_model):
    folder = tiny_model("qwen3")
    prompts = random_prompts(4, seed=2, hi=48)
    llm = LLM(folder, block_size=4, max_num_batched_tokens=32)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3))
    hf = _hf(folder)
    for prompt, out in zip(prompts, outs):
        o = out.outputs[0]
        seq = torch.tensor([prompt + o.token_ids])
        with torch.no_grad():
            lp = hf(seq).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
        for step, (tok, entry) in enumerate(zip(o.token_ids, o.logprobs)):
            assert abs(entry[tok].logprob - lp[step, tok].item()) < 1e-4
            assert entry[tok].rank == 1  # greedy picks the top token
            top = lp[step].topk(3)
            for val, idx in zip(top.values.tolist(), top.indices.tolist()):
                assert abs(entry[idx].logprob - val) < 1e-4


def test_string_prompts_and_eos(tiny_model):
    folder = tiny_model("llama")
    llm = LLM(folder)
    tok = llm.get_tokenizer()
    out = llm.generate("the quick brown fox", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.prompt == "the quick brown fox"
    assert out.prompt_token_ids == tok.encode("the quick brown fox")
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids)
