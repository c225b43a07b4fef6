"""AsyncEngine: the Engine on a background thread, with an async stream of output deltas per request.

The engine thread owns all scheduler state. Event loops talk to it through a thread-safe inbox (adds and
aborts) and receive deltas through per-request asyncio queues filled with call_soon_threadsafe. Model
compute releases the GIL, so the serving loop stays responsive during a step.
"""
import asyncio
import logging
import queue
import threading
from typing import AsyncIterator, Callable

from kvserve.runtime.config import EngineConfig
from kvserve.runtime.engine import Engine
from kvserve.runtime.outputs import RequestOutput
from kvserve.runtime.sampling_params import SamplingParams
from kvserve.runtime.stats import EngineStats, StepStats

log = logging.getLogger("kvserve.engine")


class EngineDeadError(RuntimeError):
    pass


class EngineOverloadedError(RuntimeError):
    """More requests wait than `max_waiting_requests` allows: refused at once rather than queued."""


class RequestTimeoutError(TimeoutError):
    """A request ran past its deadline; it was aborted and its blocks freed."""


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # its loop is closed: nobody is left to read it
            pass


class AsyncEngine:
    def __init__(self, config: EngineConfig, stat_loggers: list[Callable[[StepStats], None]] = ()):
        self.engine = Engine(config)
        self.config = config
        self.tokenizer = self.engine.tokenizer
        self.stat_loggers = list(stat_loggers)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stats = self.engine.stats()
        self.dead_error: BaseException | None = None

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        # nothing will be delivered any more: end the open streams instead of leaving them waiting
        self._fail_streams(EngineDeadError("the engine was shut down"))

    def _fail_streams(self, error: EngineDeadError) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            s.put(error)

    def num_requests(self) -> int:
        """Requests handed in and not yet fully read by their callers."""
        return len(self._streams)

    def stats(self) -> EngineStats:
        return self._stats

    # -- the engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            busy = False
            while not self._stop:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    if busy or self.engine.pending_events:  # going idle: loggers see the final counts
                        self._log(self.engine.step_stats())
                        busy = False
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    self._stats = self.engine.stats()  # background work (offload saves) moves counters
                    continue
                busy = True
                outputs, step_stats = self.engine.step()
                for out in outputs:
                    self._deliver(out)
                self._log(step_stats)
        except BaseException as e:  # the loop is dead: fail every stream now rather than hang them
            log.exception("engine loop died")
            with self._lock:  # generate() checks under the lock, so no stream opens after this
                self.dead_error = e
            self._fail_streams(EngineDeadError(f"engine loop died: {e!r}"))

    def _log(self, step_stats: StepStats) -> None:
        self._stats = step_stats.stats
        for logger in self.stat_loggers:
            logger(step_stats)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add(item)
                except ValueError as e:  # e.g. its LoRA adapter was unloaded while it waited in the inbox
                    with self._lock:
                        stream = self._streams.get(item.request_id)
                    if stream is not None:
                        stream.put(e)
            elif kind == "call":
                fn, loop, future = item
                try:
                    result, error = fn(), None
                except Exception as e:
                    result, error = None, e
                loop.call_soon_threadsafe(_settle, future, result, error)
            else:
                out = self.engine.abort(item)
                if out is not None:
                    self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.get(out.request_id)
        if stream is not None:
            stream.put(out)

    # -- the caller's side ----------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams, request_id: str,
                       lora_name: str | None = None, timeout: float | None = None) -> AsyncIterator[RequestOutput]:
        """`timeout`: seconds from now after which the request is aborted and RequestTimeoutError raised."""
        self._check_alive()
        req = self.engine.make_request(prompt, sampling_params, request_id, lora_name)
        prompt_len, max_len = len(req.prompt_token_ids), self.engine.max_model_len
        if sampling_params.max_tokens is not None and prompt_len + sampling_params.max_tokens > max_len:
            # vLLM's serving rule: refuse rather than silently cut the completion short
            raise ValueError(f"max_tokens is too large: the prompt has {prompt_len} tokens and max_tokens is "
                             f"{sampling_params.max_tokens}, {prompt_len + sampling_params.max_tokens} in all, but "
                             f"max_model_len is {max_len}; ask for at most {max_len - prompt_len} tokens")
        limit = self.config.max_waiting_requests
        if limit is not None and len(self._streams) - self._stats.num_running >= limit:
            raise EngineOverloadedError(f"too many requests waiting (max_waiting_requests {limit}); retry later")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop)
        with self._lock:
            self._check_alive()
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        self._inbox.put(("add", req))
        self._wake.set()
        timer = None if timeout is None else loop.call_later(
            timeout, stream.queue.put_nowait, RequestTimeoutError(f"the request ran past its timeout of {timeout:g} s"))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (disconnect, cancel, timeout): free the request's blocks
                self.abort(request_id)

    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"engine loop died: {self.dead_error!r}")
        if self._stop:
            raise EngineDeadError("the engine was shut down")

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # -- LoRA adapters (see Engine.add_lora) ------------------------------------------------------------
    async def add_lora(self, name: str, path: str):
        """Load an adapter from a local folder; ValueError names what does not fit. Reads off the loop."""
        return await asyncio.to_thread(self.engine.add_lora, name, path)

    async def remove_lora(self, name: str) -> None:
        """Unload an adapter; ValueError if unknown or still used by a request (including ones handed in
        but not yet seen by the engine thread, since this runs there after them)."""
        if self._thread is None:
            return self.engine.remove_lora(name)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("call", (lambda: self.engine.remove_lora(name), loop, future)))
        self._wake.set()
        while not future.done():
            self._check_alive()  # a dead or stopped loop never runs the call
            await asyncio.wait([future], timeout=1.0)
        return future.result()

    def list_loras(self):
        return self.engine.list_loras()


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
