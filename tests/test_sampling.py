"""Sampling, seeds, stops, n > 1 and detokenization."""

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.runtime.sampler import uniform_noise


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama"), block_size=4)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([5, 6, 7], p)[0].outputs[0].token_ids
    others = [[i, i + 1, i + 2, i + 3] for i in range(10, 17)]
    mixed = llm.generate(others[:3] + [[5, 6, 7]] + others[3:],
                         [SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True)] * 3 + [p]
                         + [SamplingParams(temperature=1.0, seed=9, max_tokens=5, ignore_eos=True)] * 4)
    assert mixed[3].outputs[0].token_ids == alone
    other_seed = llm.generate([5, 6, 7], SamplingParams(temperature=1.0, seed=4321, max_tokens=16, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_sequences_differ_and_share_the_prompt(llm):
    out = llm.generate([1, 2, 3], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    assert all(len(o.token_ids) == 12 for o in out.outputs)


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = llm.generate([9, 8, 7], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    for p in (SamplingParams(temperature=1.5, top_k=1, seed=3, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=1.5, top_p=1e-6, seed=3, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=1.5, min_p=1.0, seed=3, max_tokens=10, ignore_eos=True)):
        assert llm.generate([9, 8, 7], p)[0].outputs[0].token_ids == greedy.token_ids


def test_noise_is_uniform_and_keyed():
    u = uniform_noise(torch.tensor([1, 2]), torch.tensor([0, 0]), 20000)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1])
    assert torch.equal(u, uniform_noise(torch.tensor([1, 2]), torch.tensor([0, 0]), 20000))


def test_repetition_penalty_changes_greedy_and_frequency_penalty_discourages_repeats(llm):
    base = llm.generate([4, 4, 4, 4], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    pen = llm.generate([4, 4, 4, 4], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                     frequency_penalty=2.0, presence_penalty=2.0))[0].outputs[0]
    rep = llm.generate([4, 4, 4, 4], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                     repetition_penalty=5.0))[0].outputs[0]
    assert len(set(pen.token_ids)) >= len(set(base.token_ids))
    assert pen.token_ids != base.token_ids or len(set(base.token_ids)) == 24
    assert 4 not in rep.token_ids[:1] or base.token_ids[0] != 4


def test_stop_strings_and_stop_tokens(llm):
    tok = llm.get_tokenizer()
    full = llm.generate("the quick", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    out = llm.generate("the quick", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:full.text.index(stop)]
    incl = llm.generate("the quick", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=stop,
                                                    include_stop_str_in_output=True))[0].outputs[0]
    assert incl.text == full.text[:full.text.index(stop) + len(stop)]
    t = full.token_ids[4]
    by_id = llm.generate("the quick", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                     stop_token_ids=[t]))[0].outputs[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == t
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(t) + 1]
    assert by_id.text == tok.decode(full.token_ids[:full.token_ids.index(t)])


def test_min_tokens_blocks_eos(llm):
    eos = llm.get_tokenizer().eos_token_id
    # make EOS the stop token the model would pick first, then require 5 tokens
    first = llm.generate([3, 1, 4], SamplingParams(temperature=0, max_tokens=1))[0].outputs[0].token_ids[0]
    out = llm.generate([3, 1, 4], SamplingParams(temperature=0, max_tokens=8, min_tokens=5,
                                                 stop_token_ids=[first]))[0].outputs[0]
    assert len(out.token_ids) >= 5 and first not in out.token_ids[:5]
    assert eos is not None


def test_multibyte_text_streams_whole_characters(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("café 東京 🙂 naïve")
    # teacher-force the characters through the detokenizer one token at a time
    from kvserve.runtime.detokenizer import detokenize, init_offsets, take_text_delta
    from kvserve.runtime.sequence import Request, Sequence
    req = Request("x", None, [1], SamplingParams(), 0.0)
    seq = Sequence(0, req, 0, [1], 0)
    init_offsets(seq)
    pieces = []
    for t in ids:
        seq.token_ids.append(t)
        detokenize(tok, seq)
        d = take_text_delta(seq)
        assert "\ufffd" not in d
        pieces.append(d)
    assert "".join(pieces) == "café 東京 🙂 naïve"
    assert any(p == "" for p in pieces)  # some token ended mid-character and was held back


def test_bad_params_are_clear_errors(llm):
    for kwargs, word in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(n=0), "n"),
                         (dict(max_tokens=-3), "max_tokens"), (dict(top_k=-5), "top_k")]:
        with pytest.raises(ValueError, match=word):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([10 ** 6], SamplingParams())
    with pytest.raises(ValueError, match="at most"):
        llm.generate([1] * 5000, SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], SamplingParams())
