"""Property test: random arrivals, lengths and aborts always end with every block free and every request
answered exactly once with a finish reason."""
import random

from hypothesis import HealthCheck, given, settings, strategies as st

from kvserve.runtime.config import EngineConfig
from kvserve.runtime.engine import Engine
from kvserve.runtime.sampling_params import SamplingParams

_engines: dict[str, Engine] = {}


def _engine(folder: str, prefix: bool) -> Engine:
    key = f"{folder}:{prefix}"
    if key not in _engines:
        _engines[key] = Engine(EngineConfig(model=folder, block_size=4, num_gpu_blocks_override=20,
                                            max_num_batched_tokens=16, max_num_seqs=4, max_model_len=64,
                                            enable_prefix_caching=prefix))
    return _engines[key]


request = st.tuples(
    st.integers(0, 6),  # arrival step
    st.integers(1, 40),  # prompt length
    st.integers(1, 16),  # max_tokens
    st.integers(1, 2),  # n
    st.one_of(st.none(), st.integers(0, 12)),  # abort after this many steps
    st.booleans(),  # shared prefix
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(request, min_size=1, max_size=10), prefix=st.booleans(), seed=st.integers(0, 1000))
def test_blocks_always_return_and_no_request_is_lost(tiny_model, reqs, prefix, seed):
    eng = _engine(tiny_model("qwen3"), prefix)
    rng = random.Random(seed)
    pending = sorted(enumerate(reqs), key=lambda x: x[1][0])
    finished: dict[str, str] = {}
    started: dict[str, int] = {}
    aborts: dict[str, int] = {}
    step = 0
    while pending or eng.has_unfinished():
        while pending and pending[0][1][0] <= step:
            i, (_, plen, max_tokens, n, abort_after, shared) = pending.pop(0)
            prompt = ([7] * 12 if shared else []) + [rng.randrange(1, 384) for _ in range(plen)]
            rid = f"r{i}"
            eng.add_request(prompt[:60], SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens,
                                                        ignore_eos=True), rid)
            started[rid] = step
            if abort_after is not None:
                aborts[rid] = step + abort_after
        for rid, at in list(aborts.items()):
            if at <= step:
                del aborts[rid]
                out = eng.abort(rid)
                if out is not None:
                    assert rid not in finished
                    finished[rid] = "abort"
                    assert all(o.finish_reason == "abort" or o.finish_reason for o in out.outputs)
        outputs, _ = eng.step()
        for out in outputs:
            if out.finished:
                assert out.request_id not in finished
                finished[out.request_id] = "done"
        step += 1
        assert step < 2000
    assert set(finished) == set(started)
    bm = eng.block_manager
    assert bm.num_free == len(bm.blocks)
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not eng.scheduler.running and not eng.scheduler.waiting
