"""Soak: 5,000 requests over every protocol (v2 REST and gRPC, generate, generate_stream, OpenAI completions and
chat, streaming and not, some through a LoRA adapter) against one server, 32 in flight, with client disconnects,
short deadlines and invalid requests mixed in at random (fixed seed). Every valid request completes; every other
one gets a clean answer (its 4xx, or the deadline's 504 / DEADLINE_EXCEEDED / error event); at the end no request,
KV block or adapter is held, and the server's RSS grew less than 10 % after warm-up."""
import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from server import MODEL_DIR, engine_flags, start_server
from tiny_models import make_adapter

pytestmark = pytest.mark.slow

TOTAL, WARMUP, IN_FLIGHT, SEED = 5000, 500, 32, 20261121
KINDS = ["v2_rest", "v2_grpc", "generate", "generate_stream", "completions", "completions_stream", "chat",
         "chat_stream"]
WORDS = ["lighthouse", "tomatoes", "Kubernetes", "bicycle", "weather", "bread", "garden", "storm", "harbor"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    adapter = make_adapter(str(MODEL_DIR), tmp_path_factory.mktemp("soak") / "sql", r=8, seed=3)
    s = start_server(["--model_dir", str(MODEL_DIR),
                      *engine_flags(max_num_seqs=32, num_gpu_blocks_override=256, max_loras=1, max_lora_rank=8),
                      "--lora-allowed-roots", str(Path(adapter).parent), "--lora-modules", f"sql={adapter}"])
    yield s
    s.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def plan(rng: random.Random, i: int) -> dict:
    """One request: its protocol, prompt, max_tokens, adapter, and what goes wrong with it (if anything)."""
    roll = rng.random()
    mode = "disconnect" if roll < 0.08 else "deadline" if roll < 0.16 else "invalid" if roll < 0.24 else "valid"
    return {"kind": rng.choice(KINDS), "mode": mode, "max_tokens": rng.randint(1, 4), "lora": rng.random() < 0.1,
            "prompt": f"{rng.choice(WORDS)} {rng.choice(WORDS)} {i}", "timeout": rng.uniform(0.001, 0.05),
            "giveup": rng.uniform(0.001, 0.03), "invalid": rng.randrange(4)}


class Soak:
    def __init__(self, server, http: httpx.AsyncClient, grpc):
        self.server, self.http, self.grpc, self.m = server, http, grpc, server.model
        self.outcomes: Counter = Counter()
        self.failures: list[str] = []

    def fail(self, p, what):
        if len(self.failures) < 20:
            self.failures.append(f"{p['kind']}/{p['mode']}/{p['invalid']}: {what}")

    # -- request bodies --------------------------------------------------------------------------------------
    def sampling(self, p) -> dict:
        fields = {"max_tokens": p["max_tokens"], "temperature": 0}
        if p["mode"] == "invalid":  # each protocol's own ways of being wrong
            fields.update([{"max_tokens": -1}, {"temperature": "hot"}, {"top_p": 7.0}, {"bogus": 1}][p["invalid"]])
        return fields

    def http_request(self, p) -> tuple[str, dict]:
        kind, fields = p["kind"], self.sampling(p)
        if p["mode"] == "deadline":
            fields["timeout"] = p["timeout"] * (1e6 if kind == "v2_rest" else 1)  # v2: Triton's microseconds
        if kind == "v2_rest":
            if p["lora"]:
                fields["lora"] = "sql"
            return f"/v2/models/{self.m}/infer", {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                                                             "data": [p["prompt"]]}], "parameters": fields}
        if kind.startswith("generate"):
            body = {"text_input": p["prompt"], **fields, **({"lora": "sql"} if p["lora"] else {})}
            return f"/v2/models/{self.m}/{kind}", body
        body = {"model": "sql" if p["lora"] else self.m, **fields, "stream": kind.endswith("stream")}
        if kind.startswith("chat"):
            return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": p["prompt"]}]}
        return "/v1/completions", {**body, "prompt": p["prompt"]}

    # -- one request -------------------------------------------------------------------------------------------
    async def one(self, p) -> None:
        try:
            outcome = await (self.grpc_one(p) if p["kind"] == "v2_grpc" else self.http_one(p))
        except Exception as e:  # noqa: BLE001 - any surprise is a failure of the soak
            outcome = "failed"
            self.fail(p, repr(e))
        self.outcomes[(p["mode"], outcome)] += 1

    async def http_one(self, p) -> str:
        path, body = self.http_request(p)
        streaming = p["kind"].endswith("stream")
        timeout = p["giveup"] if p["mode"] == "disconnect" and not streaming else 60
        try:
            if streaming:
                return await self.http_stream(p, path, body)
            r = await self.http.post(path, json=body, timeout=timeout)
        except httpx.TimeoutException:
            if p["mode"] == "disconnect":
                return "left"
            raise
        return self.judge(p, r.status_code, r.json(), streaming=False)

    async def http_stream(self, p, path, body) -> str:
        async with self.http.stream("POST", path, json=body, timeout=60) as r:
            if r.status_code != 200:
                await r.aread()
                return self.judge(p, r.status_code, r.json(), streaming=True)
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    if p["mode"] == "disconnect":
                        return "left"  # leaving the block hangs up mid-stream
        return self.judge(p, 200, events, streaming=True)

    def judge(self, p, status: int, body, streaming: bool) -> str:
        mode = p["mode"]
        if mode == "invalid":
            if status == 400:
                return "refused"
            self.fail(p, f"invalid request answered {status}: {str(body)[:200]}")
            return "failed"
        if mode == "deadline" and (status == 504 or (streaming and status == 200 and "error" in body[-1]
                                                      and "timeout" in json.dumps(body[-1]))):
            return "timed out"
        if status != 200:
            self.fail(p, f"answered {status}: {str(body)[:200]}")
            return "failed"
        finish, tokens = self.finish(p["kind"], body)
        if finish not in ("stop", "length") or not 1 <= tokens <= p["max_tokens"]:
            self.fail(p, f"finish {finish!r}, {tokens} tokens: {str(body)[:300]}")
            return "failed"
        return "served"

    @staticmethod
    def finish(kind: str, body) -> tuple[str | None, int]:
        if kind == "v2_rest":
            return body["outputs"][1]["data"][0], 1  # v2 carries no token count
        if kind == "generate":
            return body["finish_reason"], body["usage"]["completion_tokens"]
        if kind == "generate_stream":
            return body[-1]["finish_reason"], body[-1]["usage"]["completion_tokens"]
        if kind in ("completions", "chat"):
            return body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]
        choices = [c for e in body for c in e["choices"]]  # OpenAI streams: one chunk per step with text
        finishes = [c["finish_reason"] for c in choices if c["finish_reason"]]
        chunks = sum(1 for c in choices if c.get("text") or c.get("delta", {}).get("content"))
        return (finishes[-1] if finishes else None), max(1, chunks)

    async def grpc_one(self, p) -> str:
        inp = grpcaio.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([p["prompt"]], dtype=np.object_))
        params = self.sampling(p)
        if params.get("temperature") == 0:
            params["temperature"] = 0.0  # a double, as tritonclient sends floats
        if p["lora"]:
            params["lora"] = "sql"
        kwargs = {"client_timeout": p["giveup"] if p["mode"] == "disconnect" else 60}
        if p["mode"] == "deadline":
            kwargs["timeout"] = max(1, int(p["timeout"] * 1e6))
        try:
            res = await self.grpc.infer(self.m, [inp], parameters=params, **kwargs)
        except InferenceServerException as e:
            status = e.status()
            if p["mode"] == "disconnect" and status == "StatusCode.DEADLINE_EXCEEDED":
                return "left"
            if p["mode"] == "deadline" and status == "StatusCode.DEADLINE_EXCEEDED":
                return "timed out"
            if p["mode"] == "invalid" and status == "StatusCode.INVALID_ARGUMENT":
                return "refused"
            self.fail(p, f"{status}: {e.message()}")
            return "failed"
        if p["mode"] == "invalid":
            self.fail(p, "invalid request served")
            return "failed"
        finish = res.as_numpy("finish_reason")[0].decode()
        if finish not in ("stop", "length"):
            self.fail(p, f"finish {finish!r}")
            return "failed"
        return "served"


async def _run(soak: Soak, plans: list[dict]) -> None:
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def gated(p):
        async with gate:
            await soak.one(p)
    await asyncio.gather(*[gated(p) for p in plans])


def test_soak(server):
    rng = random.Random(SEED)
    plans = [plan(rng, i) for i in range(TOTAL)]

    async def main():
        limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
        async with httpx.AsyncClient(base_url=server.url, limits=limits) as http:
            grpc = grpcaio.InferenceServerClient(server.grpc_addr)
            soak = Soak(server, http, grpc)
            await _run(soak, plans[:WARMUP])
            server.assert_idle()
            warm = rss_kib(server.proc.pid)
            started = time.monotonic()
            await _run(soak, plans[WARMUP:])
            await grpc.close()
            return soak, warm, time.monotonic() - started

    started = time.monotonic()
    soak, warm, main_phase = asyncio.run(main())
    elapsed = time.monotonic() - started
    stats = server.assert_idle()
    end = rss_kib(server.proc.pid)
    server.assert_alive()
    summary = {f"{mode}:{outcome}": n for (mode, outcome), n in sorted(soak.outcomes.items())}
    print(f"\n{TOTAL} requests in {elapsed:.0f}s ({TOTAL - WARMUP} after warm-up in {main_phase:.0f}s); "
          f"RSS {warm / 1024:.1f} MiB after warm-up, {end / 1024:.1f} MiB at the end "
          f"({100 * (end - warm) / warm:+.1f} %); {summary}")
    assert not soak.failures, "\n".join(soak.failures)
    assert sum(soak.outcomes.values()) == TOTAL
    for mode, outcome in (("valid", "served"), ("invalid", "refused"), ("disconnect", "left")):
        assert soak.outcomes[(mode, outcome)] > 0, summary  # each mix really happened
    assert soak.outcomes[("deadline", "timed out")] > 0, summary
    assert stats["running_loras"] == [] and stats["waiting_loras"] == [], stats
    assert end < warm * 1.10, f"RSS grew from {warm} KiB to {end} KiB"
