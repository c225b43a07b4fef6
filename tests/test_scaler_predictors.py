"""KEDA's view of real predictors: `kvserve scaler --targets A,B` in front of two `kvserve serve` processes with two
batch slots each, queried with the gRPC client generated from adapters/protos. Under slow requests that queue, the
scaler reports exactly the predictors' summed queue depth and is active; once they are answered it reports 0 and
is idle; its metric spec follows the trigger's metadata."""
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from server import MODEL_DIR, MODEL_NAME, engine_flags, start_server
from test_scaler import TIMEOUT, Scaler, active, metric, ref

SLOTS, PER_PREDICTOR, MAX_TOKENS = 2, 8, 256  # 8 requests through 2 batch slots: 6 of them wait on each predictor


@pytest.fixture(scope="module")
def predictors():
    with ThreadPoolExecutor(2) as pool:
        starts = [pool.submit(start_server, ["--model_dir", str(MODEL_DIR), *engine_flags(max_num_seqs=SLOTS)])
                  for _ in range(2)]
        servers = [s.result() for s in starts]
    yield servers
    for s in servers:
        s.stop()


def load(servers) -> tuple[threading.Thread, list]:
    """PER_PREDICTOR slow requests on each predictor at once, from a background thread."""
    results = []

    async def run():
        calls = []
        for s in servers:
            client = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=300)
            calls += [client.completions.create(model=MODEL_NAME, prompt=list(range(30 + 9 * i, 36 + 9 * i)),
                                                max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
                      for i in range(PER_PREDICTOR)]
        results.extend(await asyncio.gather(*calls, return_exceptions=True))

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    return thread, results


def test_scaler_reports_real_predictors_queue(predictors, tmp_path):
    a, b = predictors
    scaler = Scaler(tmp_path, "--targets", f"{a.http_addr},{b.http_addr}")
    try:
        assert metric(scaler.stub) == 0 and active(scaler.stub) is False
        [spec] = scaler.stub.GetMetricSpec(ref(targetQueueDepth="2.5"), timeout=TIMEOUT).metricSpecs
        assert (spec.metricName, spec.targetSize, spec.targetSizeFloat) == ("kvserve-queue-depth", 3, 2.5)

        thread, results = load(predictors)
        full = 2 * (PER_PREDICTOR - SLOTS)
        seen, active_seen, with_running = [], False, None
        started = time.monotonic()
        while thread.is_alive() and (not seen or seen[-1] != full):
            seen.append(metric(scaler.stub))
            time.sleep(0.02)
        if seen and seen[-1] == full:  # every request is in: two run and the rest wait on each predictor
            active_seen = active(scaler.stub)
            with_running = metric(scaler.stub, includeRunning="true")
        thread.join(timeout=300)
        took = time.monotonic() - started
        assert not thread.is_alive() and len(results) == 2 * PER_PREDICTOR
        assert all(not isinstance(r, Exception) and r.usage.completion_tokens == MAX_TOKENS for r in results), results
        assert max(seen) == full, f"queue depths seen over {took:.1f}s: {seen}"
        assert active_seen is True
        assert with_running in (full + 2 * SLOTS, full - 1 + 2 * SLOTS, full - 2 + 2 * SLOTS)

        # The load is answered: nothing waits, and the scaler goes idle.
        deadline = time.monotonic() + 10
        while (metric(scaler.stub), active(scaler.stub)) != (0, False) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(scaler.stub) == 0 and active(scaler.stub) is False
        assert metric(scaler.stub, includeRunning="true") == 0
    finally:
        log = scaler.stop()
    assert "unreachable" not in log
