"""AsyncEngine: concurrent streams, deltas that add up to the offline output, aborts that free blocks."""
import asyncio

import pytest

from kvserve import LLM, SamplingParams
from kvserve.runtime.async_engine import AsyncEngine, EngineDeadError
from kvserve.runtime.config import EngineConfig

P = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = AsyncEngine(EngineConfig(model=tiny_model("llama"), block_size=4, num_gpu_blocks_override=64))
    eng.start()
    yield eng
    eng.shutdown()


def test_streams_match_offline_and_aborts_free_blocks(engine, tiny_model):
    prompts = [[i + 1, i + 2, i + 3, i + 4] for i in range(6)]
    ref = [o.outputs[0].token_ids for o in LLM(tiny_model("llama"), block_size=4).generate(prompts, P)]

    async def consume(i, stop_after=None):
        ids, text, n_deltas = [], "", 0
        async for d in engine.generate(prompts[i], P, f"s{i}"):
            n_deltas += 1
            for o in d.outputs:
                ids += o.token_ids
                text += o.text
            if stop_after and len(ids) >= stop_after:
                break
        return ids, n_deltas

    async def main():
        full = await asyncio.gather(*[consume(i) for i in range(6)])
        cut = await asyncio.gather(*[consume(i, 2) for i in range(6)])
        for _ in range(50):
            await asyncio.sleep(0.05)
            if engine.stats().num_free_blocks == 64 and engine.stats().num_running == 0:
                break
        return full, cut

    full, cut = asyncio.run(main())
    assert [f[0] for f in full] == ref
    assert all(f[1] > 1 for f in full)  # streamed in several deltas
    assert all(len(c[0]) < 12 for c in cut)
    stats = engine.stats()
    assert stats.num_free_blocks == 64 and stats.num_running == 0 and stats.num_waiting == 0


def test_bad_request_raises_before_streaming(engine):
    async def main():
        with pytest.raises(ValueError, match="vocabulary"):
            async for _ in engine.generate([10 ** 7], P, "bad"):
                pass
        async for d in engine.generate([1, 2], P, "after-bad"):  # still serving
            last = d
        return last
    assert asyncio.run(main()).finished


def test_dead_loop_fails_streams_instead_of_hanging(tiny_model):
    eng = AsyncEngine(EngineConfig(model=tiny_model("llama"), block_size=4, num_gpu_blocks_override=16))

    def boom():
        raise RuntimeError("device lost")
    eng.engine.step = boom
    eng.start()

    async def main():
        with pytest.raises(EngineDeadError):
            async for _ in eng.generate([1, 2, 3], P, "x"):
                pass
        with pytest.raises(EngineDeadError):
            async for _ in eng.generate([1, 2, 3], P, "y"):
                pass
    asyncio.run(asyncio.wait_for(main(), 10))
    assert eng.errored
