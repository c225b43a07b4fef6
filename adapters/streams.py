"""Consuming engine streams on the server's event loop: several requests at once, as SSE, and cut short when
the client goes away. Closing an engine stream aborts its request and frees its KV blocks, so every path
here makes sure the streams it opened are closed however it ends."""
import asyncio
from typing import Any, AsyncIterator

import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse

from kvserve.runtime.outputs import RequestOutput

_DONE = object()


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several streams as they come, tagged with the stream's index. An exception in one stream
    is raised here; leaving early (error, aclose, cancellation) cancels the pumps, which closes the streams."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator):
        try:
            async for item in stream:
                await queue.put((i, item, None))
            await queue.put((i, _DONE, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await queue.put((i, None, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is _DONE:
                left -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """The accumulated outputs of several engine streams, in input order."""
    results: list[RequestOutput | None] = [None] * len(streams)
    async for i, delta in merge(streams):
        if results[i] is None:
            results[i] = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, outputs=[])
        results[i].merge(delta)
    return results


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class SSEResponse(StreamingResponse):
    """text/event-stream that closes its body iterator however the response ends. Starlette cancels the
    sending task on disconnect, which may leave the generator suspended at a yield; closing it here runs its
    finally blocks now instead of at garbage collection."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator, **kw):
        super().__init__(content, headers={"Cache-Control": "no-cache", **kw.pop("headers", {})}, **kw)

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, coro):
    """Run a non-streaming request, cancelling it (and so aborting its engine requests) if the client hangs
    up first. Returns None in that case: nobody is left to answer."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        watch.cancel()
        raise
    watch.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return None
    return work.result()


async def prepend(first, rest: AsyncIterator) -> AsyncIterator:
    """`first`, then the rest of a stream whose first item was taken to surface errors early."""
    yield first
    async for item in rest:
        yield item
