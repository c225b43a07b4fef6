"""Many clients at once over every protocol, against the real server: 32 concurrent streams all get their own
correct answers, and clients that hang up mid-stream (or stop waiting for a plain answer, or whose gRPC deadline
passes) have their requests aborted and their KV blocks freed."""
import asyncio
import json
import time

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from kvserve.runtime.sampling_params import SamplingParams
from server import MODEL_DIR, engine_flags, start_server

pytestmark = pytest.mark.slow

WORDS = ["lighthouse", "tomatoes", "Kubernetes", "bicycle", "weather", "bread", "garden", "storm"]
LONG = 400  # tokens a killed stream would generate if it were not aborted


@pytest.fixture(scope="module")
def server():
    s = start_server(["--model_dir", str(MODEL_DIR), *engine_flags(max_num_seqs=16, num_gpu_blocks_override=256)])
    yield s
    s.stop()


def _jobs():
    """32 streaming clients: (protocol, prompt, max_tokens), with distinct prompts and lengths so that a
    mixed-up stream shows."""
    jobs = []
    for i in range(32):
        kind = ("generate_stream", "completions", "chat")[i % 3]
        jobs.append((kind, f"The {WORDS[i % 8]} story number {i}", 4 + i % 7))
    return jobs


def _messages(prompt):
    return [{"role": "user", "content": prompt}]


async def _generate_stream(http, server, prompt, max_tokens, stop_after=None):
    text, events = "", 0
    body = {"text_input": prompt, "parameters": {"max_tokens": max_tokens, "temperature": 0,
                                                "ignore_eos": stop_after is not None}}
    async with http.stream("POST", f"{server.url}/v2/models/{server.model}/generate_stream", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                text += json.loads(line[6:])["text_output"]
                events += 1
                if events == stop_after:
                    return None  # leaving the block closes the connection mid-stream
    return text


async def _openai_stream(client, kind, prompt, max_tokens, stop_after=None):
    extra = {"ignore_eos": True} if stop_after else {}
    if kind == "completions":
        stream = await client.completions.create(model="kvserve-tiny", prompt=prompt, max_tokens=max_tokens,
                                                 temperature=0, stream=True, extra_body=extra)
    else:
        stream = await client.chat.completions.create(model="kvserve-tiny", messages=_messages(prompt),
                                                      max_tokens=max_tokens, temperature=0, stream=True,
                                                      extra_body=extra)
    text, chunks = "", 0
    async for chunk in stream:
        chunks += 1
        for c in chunk.choices:
            text += c.text if kind == "completions" else (c.delta.content or "")
        if chunks == stop_after:
            await stream.close()
            return None
    return text


def test_32_concurrent_streams_over_mixed_protocols(server, llm):
    jobs = _jobs()
    tok = llm.get_tokenizer()
    prompts = [prompt if kind != "chat" else tok(tok.apply_chat_template(_messages(prompt), tokenize=False,
                                                                         add_generation_prompt=True),
                                                 add_special_tokens=False)["input_ids"] for kind, prompt, _ in jobs]
    refs = [o.outputs[0].text for o in llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0)
                                                              for _, _, n in jobs])]
    grpc_prompts = [f"Four gRPC clients too, {w}" for w in WORDS[:4]]
    grpc_refs = [o.outputs[0].text for o in llm.generate(grpc_prompts, SamplingParams(max_tokens=5, temperature=0))]

    async def grpc_infer(client, prompt):
        inp = grpcaio.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([prompt], dtype=np.object_))
        res = await client.infer(server.model, [inp], parameters={"max_tokens": 5, "temperature": 0.0})
        return res.as_numpy("text_output")[0].decode()

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http, \
                openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                   timeout=120, http_client=httpx.AsyncClient(limits=limits)) as client:
            grpc_client = grpcaio.InferenceServerClient(server.grpc_addr)
            tasks = [_generate_stream(http, server, p, n) if kind == "generate_stream"
                     else _openai_stream(client, kind, p, n) for kind, p, n in jobs]
            tasks += [grpc_infer(grpc_client, p) for p in grpc_prompts]
            out = await asyncio.gather(*tasks)
            await grpc_client.close()
            return out

    start = time.monotonic()
    got = asyncio.run(run())
    elapsed = time.monotonic() - start
    assert got[:32] == refs
    assert got[32:] == grpc_refs
    server.assert_idle(timeout=0)
    print(f"32 streams + 4 gRPC infers in {elapsed:.2f}s")


def test_killed_streams_free_their_blocks(server):
    before = server.stats()

    async def grpc_gives_up(client, prompt):
        """A v2 gRPC client whose deadline passes: gRPC cancels the call on the server too."""
        inp = grpcaio.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([prompt], dtype=np.object_))
        try:
            await client.infer(server.model, [inp], client_timeout=0.5,
                               parameters={"max_tokens": LONG, "temperature": 0.0, "ignore_eos": True})
        except InferenceServerException as e:
            return e.status()

    async def http_gives_up(route, body):
        """A non-streaming client that stops waiting and hangs up."""
        async with httpx.AsyncClient(timeout=0.5) as http:
            try:
                await http.post(f"{server.url}{route}", json=body)
            except httpx.ReadTimeout:
                return "gave up"

    async def run():
        async with httpx.AsyncClient(timeout=120) as http, \
                openai.AsyncOpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0,
                                   timeout=120) as client:
            grpc_client = grpcaio.InferenceServerClient(server.grpc_addr)
            kills = [_generate_stream(http, server, f"Long story {i}", LONG, stop_after=2) for i in range(4)]
            kills += [_openai_stream(client, kind, f"Long chat {i}", LONG, stop_after=2)
                      for i, kind in enumerate(["chat", "completions"] * 2)]
            kills += [grpc_gives_up(grpc_client, f"Long infer {i}") for i in range(2)]
            kills += [http_gives_up(f"/v2/models/{server.model}/generate",
                                    {"text_input": "Long wait", "max_tokens": LONG, "ignore_eos": True}),
                      http_gives_up("/v1/completions", {"prompt": "Long wait", "max_tokens": LONG,
                                                        "ignore_eos": True})]
            out = await asyncio.gather(*kills)
            await grpc_client.close()
            return out

    assert asyncio.run(run()) == [None] * 8 + ["StatusCode.DEADLINE_EXCEEDED"] * 2 + ["gave up"] * 2
    stats = server.assert_idle()
    generated = stats["generation_tokens"] - before["generation_tokens"]
    # all 12 requests ran to the end only if nobody aborted them: 12 * LONG tokens
    assert generated < 12 * LONG // 2, f"{generated} tokens generated after the clients left: not aborted"
    print(f"12 abandoned requests generated {generated} tokens in all (of {12 * LONG} unaborted)")
    server.assert_alive()
