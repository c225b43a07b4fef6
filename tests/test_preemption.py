"""A flood of long prompts into a KV pool that holds one or two of them at a time (16 blocks of 4 tokens,
max_model_len 64): the scheduler preempts and recomputes, every request is answered with the offline engine's
greedy text, and at the end every block is free."""
import asyncio

import httpx
import pytest

from kvserve.runtime.sampling_params import SamplingParams
from server import MODEL_DIR, engine_flags, start_server

GEN = 16


def _prompt(i: int, length: int) -> list[int]:
    return [5 + (i * 131 + j * 17) % 4000 for j in range(length)]


# 22 prompts of 22-37 tokens (two overflow the pool as they grow), and two that fill it alone
PROMPTS = [_prompt(i, 22 + (i * 7) % 16) for i in range(22)] + [_prompt(100 + i, 64 - GEN) for i in range(2)]


@pytest.fixture(scope="module")
def server():
    s = start_server(["--model_dir", str(MODEL_DIR),
                      *engine_flags(num_gpu_blocks_override=16, block_size=4, max_model_len=64, max_num_seqs=8)])
    yield s
    s.stop()


def test_flood_served_through_preemption(server, llm):
    async def one(http, prompt):
        r = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": GEN, "temperature": 0,
                                                     "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        return body["usage"]["completion_tokens"], body["choices"][0]["text"], body["choices"][0]["finish_reason"]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            return await asyncio.gather(*[one(http, p) for p in PROMPTS])

    before = server.stats()
    results = asyncio.run(run())
    assert all(n == GEN and reason == "length" for n, _, reason in results), results
    want = llm.generate(PROMPTS, SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True))
    assert [text for _, text, _ in results] == [o.outputs[0].text for o in want]  # recomputed, same tokens
    stats = server.assert_idle(timeout=10)
    preemptions = stats["num_preemptions"] - before["num_preemptions"]
    assert preemptions > 0, stats
    assert stats["num_total_blocks"] == 16, stats
    server.assert_alive()
    print(f"{len(PROMPTS)} long prompts through a 16-block pool: {preemptions} preemptions")
