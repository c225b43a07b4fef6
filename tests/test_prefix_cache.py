"""Prefix caching computes only the new tokens of a request sharing full blocks with an earlier one."""
import random

from kvserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_shared_prefix_computes_only_new_tokens(tiny_model):
    folder = tiny_model("llama")
    rng = random.Random(0)
    prefix = [rng.randrange(1, 384) for _ in range(4 * 4 + 2)]  # 4 full blocks of 4 and a partial one
    a, b = prefix + [11, 12, 13], prefix + [21, 22]

    cached = LLM(folder, block_size=4, enable_prefix_caching=True)
    first = cached.generate(a, GREEDY)[0]
    before = cached.engine.computed_prompt_tokens
    second = cached.generate(b, GREEDY)[0]
    computed = cached.engine.computed_prompt_tokens - before
    assert computed == len(b) - 16  # the 4 full shared blocks came from the cache
    assert second.num_cached_tokens == 16
    stats = cached.engine.stats()
    assert stats.prefix_cache_hits == 16 and stats.prefix_cache_queries == len(a) + len(b)

    plain = LLM(folder, block_size=4, enable_prefix_caching=False)
    assert plain.generate(a, GREEDY)[0].outputs[0].token_ids == first.outputs[0].token_ids
    assert plain.generate(b, GREEDY)[0].outputs[0].token_ids == second.outputs[0].token_ids
    assert plain.engine.computed_prompt_tokens == len(a) + len(b)


def test_identical_prompt_recomputes_only_last_token_and_adapter_keys_differ(tiny_model):
    folder = tiny_model("qwen2")
    llm = LLM(folder, block_size=4)
    p = list(range(1, 17))  # exactly 4 blocks: the last token must still be computed for logits
    llm.generate(p, GREEDY)
    before = llm.engine.computed_prompt_tokens
    llm.generate(p, GREEDY)
    assert llm.engine.computed_prompt_tokens - before == 4  # 3 blocks hit, the last block recomputed


def test_evicted_blocks_are_recomputed_correctly(tiny_model):
    folder = tiny_model("qwen3")
    llm = LLM(folder, block_size=4, num_gpu_blocks_override=16, max_model_len=60)
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 384) for _ in range(30)] for _ in range(6)]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    again = [o.outputs[0].token_ids for o in llm.generate(prompts[::-1], GREEDY)][::-1]
    assert first == again
    assert llm.engine.block_manager.num_free == 16


def test_generated_blocks_are_cached_with_their_real_tokens(tiny_model):
    # Decode steps are pipelined (a step is launched before the previous step's token is read back), so a
    # block is hashed only once its last token is known: a follow-up turn reuses the generated blocks.
    llm = LLM(tiny_model("llama"), block_size=4)
    prompt = list(range(1, 11))
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    blocks = llm.engine.block_manager.blocks
    assert all(-1 not in b.token_ids for b in blocks)
    follow_up = prompt + out.outputs[0].token_ids + [5]
    before = llm.engine.computed_prompt_tokens
    llm.generate(follow_up, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert llm.engine.computed_prompt_tokens - before == len(follow_up) - 20  # 5 full blocks of 4 reused
