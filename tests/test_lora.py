"""Multi-LoRA serving: PEFT adapters made with the real peft library on tiny random models, served by the engine
and compared with HF transformers + PEFT, with each other, alone and mixed, swapped through few slots."""
import asyncio
import itertools
import random

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from kvserve import LLM, SamplingParams
from kvserve.runtime import scheduler
from kvserve.runtime.async_engine import AsyncEngine, EngineDeadError
from kvserve.runtime.config import EngineConfig
from kvserve.runtime.engine import Engine
from tiny_models import ALL, explain_divergence, make_adapter, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
POOL = 256  # KV blocks: plenty for these tests, and no 1 GiB default pool to allocate per engine
_ids = itertools.count()


def run(engine: Engine, jobs: list[tuple[list[int], str | None]], params=GREEDY) -> tuple[list[list[int]], set]:
    """Every job submitted at once; the outputs in job order and the largest set of adapters of one step."""
    ids = [engine.add_request(p, params, f"r{next(_ids)}", lora).request_id for p, lora in jobs]
    done, widest = {}, set()
    while engine.has_unfinished():
        outputs, step = engine.step()
        if len(step.stats.running_loras) > len(widest):
            widest = set(step.stats.running_loras)
        for out in outputs:
            done.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    return [done[i] for i in ids], widest


@pytest.mark.parametrize("kind,r,rslora", [("llama", 8, False), ("llama", 16, True), ("qwen3", 16, False),
                                           ("qwen3", 8, True)])
def test_greedy_matches_hf_peft(tiny_model, tmp_path, kind, r, rslora):
    base = tiny_model(kind)
    adapter = make_adapter(base, tmp_path / "x", r=r, alpha=2 * r, rslora=rslora, seed=r)
    # chunked prefill (budget 20) and a base-model request in the same steps
    llm = LLM(base, num_gpu_blocks_override=POOL, max_loras=2, max_lora_rank=16, lora_modules={"x": adapter},
              lora_allowed_roots=[str(tmp_path)], block_size=4, max_num_batched_tokens=20, max_num_seqs=8)
    ps = random_prompts(4, seed=r, lo=10, hi=40)
    assert max(map(len, ps)) > 20
    got, widest = run(llm.engine, [(p, "x") for p in ps] + [(ps[0], None)])
    assert widest == {"x"}
    info = llm.engine.list_loras()[0]
    assert (info.rank, info.scaling) == (r, 2 * r / (r ** 0.5 if rslora else r))

    hf_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager").eval()
    hf_base.generation_config.eos_token_id = None
    base_ref = hf_base.generate(torch.tensor([ps[0]]), max_new_tokens=8, do_sample=False)[0, len(ps[0]):].tolist()
    hf = PeftModel.from_pretrained(hf_base, adapter).eval()
    for p, out in zip(ps, got):
        ref = hf.generate(input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()
        if ref != out:
            explain_divergence(hf, p, ref, out)
    assert got[-1] == base_ref  # the base-model request in the same batch is untouched
    assert got[0] != base_ref  # and the adapter really moves the outputs


def test_eight_adapters_and_base_in_one_batch_match_solo_runs(tiny_model, tmp_path):
    base = tiny_model("qwen3")
    # ranks 8 and 16, all seven targets or a subset (untargeted modules of a slot stay zero)
    subsets = [ALL, ["q_proj", "v_proj"], ALL, ["o_proj", "down_proj"], ALL, ["gate_proj", "up_proj", "k_proj"],
               ALL, ["down_proj"]]
    adapters = {f"a{i}": make_adapter(base, tmp_path / f"a{i}", r=8 if i % 2 else 16, targets=t, seed=100 + i)
                for i, t in enumerate(subsets)}
    engine = LLM(base, num_gpu_blocks_override=POOL, max_loras=8, max_lora_rank=16, lora_modules=adapters,
                 lora_allowed_roots=[str(tmp_path)], block_size=4, enable_prefix_caching=False).engine
    ps = random_prompts(9, seed=7)
    jobs = [(p, name) for p, name in zip(ps, [*adapters, None])]
    seen = []  # the order the runner gets: one adapter's tokens side by side, for the LoRA kernels' tiles
    run_step = engine.runner.run
    engine.runner.run = lambda batch, prev=None: seen.append([s.request.lora or "" for s, _ in batch]) or \
        run_step(batch, prev)
    mixed, widest = run(engine, jobs)
    engine.runner.run = run_step
    assert widest == set(adapters)  # all eight adapters ran in the same step
    assert all(order == sorted(order) for order in seen) and any(len(set(o)) > 2 for o in seen)
    solo = [run(engine, [job])[0][0] for job in jobs]
    assert mixed == solo
    same_prompt = run(engine, [(ps[0], name) for name in [*adapters, None]])[0]
    assert len({tuple(o) for o in same_prompt}) == 9  # every adapter gives its own output


def test_swapping_through_few_slots_under_concurrent_load(tiny_model, tmp_path):
    base = tiny_model("llama")
    names = [f"s{i}" for i in range(6)]
    paths = {n: make_adapter(base, tmp_path / n, r=8, seed=200 + i) for i, n in enumerate(names)}
    ps = random_prompts(2, seed=11, lo=5, hi=12)
    ref_engine = LLM(base, num_gpu_blocks_override=POOL, max_loras=1, lora_modules={"s0": paths["s0"]},
                     lora_allowed_roots=[str(tmp_path)]).engine
    solo = {}
    for name in [*names, None]:
        if name is not None and name != "s0":
            ref_engine.add_lora(name, paths[name])
        for i, p in enumerate(ps):
            solo[name, i] = run(ref_engine, [(p, name)])[0][0]
    for i in range(len(ps)):  # a request served by the wrong adapter could not go unnoticed
        assert len({tuple(solo[n, i]) for n in [*names, None]}) == 7

    steps = []
    # two device slots, two host copies: adapters swap in and out of both while requests wait for a slot
    eng = AsyncEngine(EngineConfig(model=base, num_gpu_blocks_override=POOL, max_loras=2, max_cpu_loras=2, block_size=4,
                                   lora_modules={n: paths[n] for n in names[:3]}, lora_allowed_roots=[str(tmp_path)]),
                      stat_loggers=[steps.append])
    eng.start()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def one(name, i, k):
        ids = []
        async for delta in eng.generate(ps[i], params, f"{name}-{i}-{k}", lora_name=name):
            ids += delta.outputs[0].token_ids if delta.outputs else []
        return (name, i), ids

    async def main():
        for n in names[3:]:  # loaded at run time
            await eng.add_lora(n, paths[n])
        waves = [[one(n, i, k) for n in [*names, None] for i in range(len(ps))] for k in range(2)]
        for wave in waves:
            random.Random(0).shuffle(wave)
        first = [asyncio.ensure_future(job) for job in waves[0]]
        # the second wave comes while the first runs, after some adapters have given up their slots
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        return await asyncio.gather(*first, *waves[1])

    try:
        results = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        eng.shutdown()
    assert len(results) == 28
    for key, ids in results:
        assert ids == solo[key], key
    manager = eng.engine.runner.lora
    assert manager.num_slot_loads > 6  # every adapter had a slot, and some came back after eviction
    assert max(len(s.stats.running_loras) for s in steps) == 2  # never more adapters at once than slots
    assert any(s.stats.waiting_loras for s in steps)
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


def test_prefix_cache_is_keyed_by_adapter_and_its_content(tiny_model, tmp_path):
    base = tiny_model("qwen3")
    a, b = make_adapter(base, tmp_path / "a", seed=1), make_adapter(base, tmp_path / "b", seed=2)
    llm = LLM(base, num_gpu_blocks_override=POOL, max_loras=2, block_size=4, lora_modules={"a": a, "b": b},
              lora_allowed_roots=[str(tmp_path)])
    engine = llm.engine
    p = random_prompts(1, seed=3, lo=17, hi=17)[0]  # 4 full blocks and one more token

    def computed(lora):
        before = engine.computed_prompt_tokens
        out = run(engine, [(p, lora)])[0][0]
        return engine.computed_prompt_tokens - before, out

    n_a, out_a = computed("a")
    assert n_a == 17
    assert computed("b")[0] == 17  # same prompt, other adapter: no block shared
    assert computed(None)[0] == 17  # nor with the base model
    assert computed("a") == (1, out_a)  # same adapter: the 4 full blocks come from the cache
    # the same name now holds other weights: the old KV must not be reused
    engine.remove_lora("a")
    engine.add_lora("a", b)
    n, out = computed("a")
    assert n == 17 and out != out_a and out == computed("b")[1]


def test_refusals_name_the_problem(tiny_model, tmp_path):
    base = tiny_model("qwen3")
    inside = tmp_path / "roots"
    good = make_adapter(base, inside / "good", r=8)
    engine = LLM(base, num_gpu_blocks_override=POOL, max_loras=1, max_lora_rank=8,
                 lora_allowed_roots=[str(inside)]).engine

    def refused(match, name, folder):
        with pytest.raises(ValueError, match=match):
            engine.add_lora(name, str(folder))

    refused("rank 16 exceeds max_lora_rank 8", "big", make_adapter(base, inside / "big", r=16))
    refused(r"target module\(s\) lm_head not supported", "head",
            make_adapter(base, inside / "head", targets=["lm_head"]))
    refused(r"target module\(s\) embed_tokens not supported", "emb",
            make_adapter(base, inside / "emb", targets=["embed_tokens"]))
    refused("DoRA", "dora", make_adapter(base, inside / "dora", use_dora=True))
    refused("modules_to_save", "mts",
            make_adapter(base, inside / "mts", targets=["q_proj"], modules_to_save=["lm_head"]))
    # made for another base model: k_proj has 2 KV heads there, 1 here
    refused(r"k_proj has lora_A \(8, 64\) and lora_B \(64, 8\), but the base model needs \[r, 64\] and \[32, r\]",
            "other", make_adapter(tiny_model("llama"), inside / "other"))
    refused("outside the allowed adapter roots", "out", make_adapter(base, tmp_path / "outside"))
    refused("outside the allowed adapter roots", "dots", inside / ".." / "outside")
    refused("is a URI", "s3", "s3://bucket/adapter")
    refused("no adapter_config.json", "empty", inside)
    assert engine.list_loras() == []

    engine.add_lora("good", good)
    refused("already loaded", "good", good)
    with pytest.raises(ValueError, match=r"unknown LoRA adapter 'nope' \(loaded: good\)"):
        engine.make_request([1, 2, 3], GREEDY, "x", lora="nope")
    engine.add_request([1, 2, 3], GREEDY, "busy", lora="good")
    with pytest.raises(ValueError, match="in use by 1 request"):
        engine.remove_lora("good")
    while engine.has_unfinished():
        engine.step()
    engine.remove_lora("good")
    with pytest.raises(ValueError, match="unknown LoRA adapter 'good'"):
        engine.make_request([1, 2, 3], GREEDY, "y", lora="good")

    plain = LLM(base, num_gpu_blocks_override=POOL).engine  # LoRA off
    with pytest.raises(ValueError, match="unknown LoRA adapter 'good'"):
        plain.make_request([1, 2, 3], GREEDY, "z", lora="good")
    with pytest.raises(ValueError, match="not enabled"):
        plain.add_lora("good", good)


def test_default_roots_and_layer_count(tmp_path):
    from tiny_models import build_model
    base = build_model(str(tmp_path / "model"), "llama")
    deeper = build_model(str(tmp_path / "deeper"), "llama", num_hidden_layers=3)
    make_adapter(base, tmp_path / "model" / "adapters" / "ok")  # the model's own adapters/ folder is allowed
    make_adapter(deeper, tmp_path / "model" / "adapters" / "deep")
    engine = LLM(base, num_gpu_blocks_override=POOL, max_loras=1).engine
    assert engine.add_lora("ok", str(tmp_path / "model" / "adapters" / "ok")).target_modules == ALL
    with pytest.raises(ValueError, match="is for layer 2, but the model has 2 layers"):
        engine.add_lora("deep", str(tmp_path / "model" / "adapters" / "deep"))
    with pytest.raises(ValueError, match="outside the allowed adapter roots"):
        engine.add_lora("far", str(tmp_path / "deeper"))


def test_triton_kernels_in_the_model_match_the_references(tiny_model, tmp_path):
    # The same mixed batch through the Triton kernels (the interpreter on CPU) and through the torch references:
    # the fused modules' shard offsets, strides and zero-padded ranks as the model really lays them out.
    base = tiny_model("qwen3")
    a = make_adapter(base, tmp_path / "a", r=8, seed=1)
    b = make_adapter(base, tmp_path / "b", r=16, seed=2, targets=["q_proj", "v_proj", "up_proj", "down_proj"])
    ps = random_prompts(3, seed=5, lo=5, hi=20)
    jobs = [(ps[0], "a"), (ps[1], "b"), (ps[2], None), (ps[0], "b")]
    outs = {}
    for backend in ["torch", "triton"]:
        llm = LLM(base, num_gpu_blocks_override=64, max_loras=2, lora_modules={"a": a, "b": b}, dtype="float32",
                  lora_allowed_roots=[str(tmp_path)], attention_backend=backend, enforce_eager=True)
        outs[backend] = run(llm.engine, jobs, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert outs["triton"] == outs["torch"]
    assert len({tuple(o) for o in outs["torch"]}) == 4


def test_async_load_unload_ordering(tiny_model, tmp_path):
    base = tiny_model("llama")
    path = make_adapter(base, tmp_path / "x", seed=5)
    eng = AsyncEngine(EngineConfig(model=base, num_gpu_blocks_override=POOL, max_loras=1,
                                   lora_allowed_roots=[str(tmp_path)]))
    eng.start()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    async def consume(rid, lora):
        return [t async for d in eng.generate([1, 2, 3], params, rid, lora_name=lora) for t in d.outputs[0].token_ids]

    async def main():
        await eng.add_lora("x", path)
        assert [i.name for i in eng.list_loras()] == ["x"]
        task = asyncio.ensure_future(consume("a", "x"))
        await asyncio.sleep(0)  # handed in, maybe not yet seen by the engine thread: it still counts
        with pytest.raises(ValueError, match="in use by 1 request"):
            await eng.remove_lora("x")
        assert len(await task) == 24
        await eng.remove_lora("x")
        with pytest.raises(ValueError, match="unknown LoRA adapter 'x'"):
            await consume("b", "x")
        # unloaded between validation and the engine thread: the stream fails, the engine lives on
        await eng.add_lora("x", path)
        removal = asyncio.ensure_future(eng.remove_lora("x"))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="unknown LoRA adapter 'x'|was replaced"):
            await consume("c", "x")
        await removal
        return await consume("d", None)

    try:
        assert len(asyncio.run(asyncio.wait_for(main(), 60))) == 24
    finally:
        eng.shutdown()
    assert not eng.errored and eng.stats().num_running == 0
    with pytest.raises(EngineDeadError, match="shut down"):  # no loop runs the call: refused, not hung
        asyncio.run(asyncio.wait_for(eng.remove_lora("x"), 10))


@pytest.mark.parametrize("max_skips", [scheduler.MAX_LORA_SKIPS, 10 ** 9])
def test_an_adapter_waiting_for_a_slot_is_not_starved(tiny_model, tmp_path, monkeypatch, max_skips):
    # One device slot, a steady stream of requests for adapter "a" (one new each step, each running a few
    # steps), one request for "c". Passed over MAX_LORA_SKIPS times, "c" stops further "a" admissions until
    # the slot frees; a base-model request still gets in meanwhile. With no limit (the control), "c" waits
    # as long as "a" traffic lasts.
    base = tiny_model("qwen3")
    limit = scheduler.MAX_LORA_SKIPS
    monkeypatch.setattr(scheduler, "MAX_LORA_SKIPS", max_skips)
    adapters = {"a": make_adapter(base, tmp_path / "a"), "c": make_adapter(base, tmp_path / "c")}
    engine = LLM(base, num_gpu_blocks_override=POOL, max_loras=1, lora_modules=adapters,
                 lora_allowed_roots=[str(tmp_path)]).engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    finished_at = {}
    for step in range(4 * limit):
        engine.add_request([1, 2, 3, step % 50 + 4], params, f"a{step}", lora="a")
        if step == 1:
            engine.add_request([5, 6, 7], params, "c", lora="c")
        if step == limit + 3:
            engine.add_request([8, 9], params, "plain")
        outputs, _ = engine.step()
        finished_at.update((o.request_id, step) for o in outputs if o.finished)
    if max_skips == 10 ** 9:
        assert "c" not in finished_at
    else:
        assert limit < finished_at["c"] < 2 * limit
        assert finished_at["plain"] < finished_at["c"]  # admitted while "a" drained
        assert f"a{3 * limit}" in finished_at  # and "a" runs again after
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.bm.num_free == POOL
