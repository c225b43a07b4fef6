"""Liveness, readiness and the graceful shutdown.

KServe's `/v2/health/ready` always answers true and its `/v2/health/live` ignores the engine; these routes,
registered before KServe's, answer from the model: ready while the engine runs and the server is not
draining, live unless the engine loop died (nothing but a restart brings it back).

SIGTERM (Kubernetes' pod deletion): readiness turns false at once and new inference requests get 503, while
the requests already running finish, for up to the grace period; those still running then are ended with an
error. Only then does uvicorn get the signal: it closes the listeners and lets the connections finish, and
ModelServer stops gRPC and unloads the model as usual; the process exits 0. A second SIGTERM skips the wait.
uvicorn takes SIGTERM while it starts, so the handler is swapped in from the app's startup event.
"""
import asyncio
import logging
import signal
import threading

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from kvserve.adapters.predictor import KVServeModel

log = logging.getLogger("kvserve.lifecycle")


class Lifecycle:
    def __init__(self, model: KVServeModel, grace_period: float):
        self.model, self.grace_period = model, grace_period
        self._uvicorn_handler = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def register(self, app: FastAPI) -> None:
        @app.get("/v2/health/live", tags=["health"])
        async def live():
            if not self.model.live():
                return JSONResponse({"live": False, "error": "the engine loop died"}, status_code=503)
            return {"live": True}

        @app.get("/v2/health/ready", tags=["health"])
        async def ready():
            if not await self.model.healthy():
                reason = "shutting down" if self.model.draining else "the model is not ready"
                return JSONResponse({"ready": False, "error": reason}, status_code=503)
            return {"ready": True}

        app.router.add_event_handler("startup", self._take_sigterm)

    def _take_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            return
        self._loop = asyncio.get_running_loop()
        self._uvicorn_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, sig, frame) -> None:
        if self.model.draining:  # asked twice: stop waiting
            self._pass_on(sig, frame)
            return
        self.model.draining = True
        log.warning("SIGTERM: not ready, refusing new requests; %d running get up to %g s to finish",
                    self._running(), self.grace_period)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain(sig, frame)))

    def _running(self) -> int:
        engine = self.model.async_engine
        return engine.num_requests() if engine is not None else 0

    async def _drain(self, sig, frame) -> None:
        deadline = self._loop.time() + self.grace_period
        while self._running() and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._running():
            log.warning("grace period over: ending %d running requests", self._running())
            self.model.async_engine.shutdown()  # their streams end with an error now
        self._pass_on(sig, frame)

    def _pass_on(self, sig, frame) -> None:
        handler, self._uvicorn_handler = self._uvicorn_handler, None
        if callable(handler):
            handler(sig, frame)
        elif handler is not None:  # SIG_DFL: what the signal would have done without us
            signal.signal(sig, handler)
            signal.raise_signal(sig)

