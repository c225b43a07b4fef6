"""Triton's generate extension, which KServe dropped in 0.13, plus a stats route for operators and tests.

    POST /v2/models/{m}/generate         {"text_input": "...", "parameters": {...}} -> one JSON answer
    POST /v2/models/{m}/generate_stream  same body -> SSE, one `data: {...}` event per engine step
    GET  /v2/models/{m}/stats            the engine's EngineStats (running, waiting, KV blocks, counters)

Sampling fields may sit at the top level (Triton maps those to input tensors) or under "parameters";
the top level wins.
"""
import dataclasses

from fastapi import APIRouter, FastAPI, Request, Response
from kserve.errors import ModelNotFound, ModelNotReady
from pydantic import ConfigDict, create_model

from kvserve.adapters.params import SamplingFields, request_ids, sampling_params
from kvserve.adapters.predictor import KVServeModel
from kvserve.adapters.streams import SSEResponse, collect, prepend, sse, unless_disconnected
from kvserve.runtime.outputs import RequestOutput

GenerateParameters = create_model("GenerateParameters", __base__=SamplingFields, stream=(bool | None, None),
                                  lora=(str | None, None), timeout=(float | None, None))


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "example": {"text_input": "The lighthouse keeper", "parameters": {"max_tokens": 16, "temperature": 0}}})
    text_input: str
    id: str | None = None
    lora: str | None = None  # a LoRA adapter to run (or address the adapter by name in the URL)
    timeout: float | None = None  # seconds until the request is aborted (504)
    parameters: GenerateParameters | None = None


def _event(model_name: str, base: str, out: RequestOutput, completion_tokens: int) -> dict:
    o = out.outputs[0]
    event = {"id": base, "model_name": model_name, "text_output": o.text, "finish_reason": o.finish_reason}
    if out.finished:
        event["usage"] = {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": completion_tokens}
    return event


def register_generate_routes(app: FastAPI, model: KVServeModel) -> None:
    router = APIRouter(prefix="/v2/models/{model_name}", tags=["generate"])

    def prepare(model_name: str, body: GenerateRequest, request: Request):
        resolved = (model_name, None) if model_name == model.name else model.resolve(model_name)
        if resolved is None:
            raise ModelNotFound(model_name)
        fields = body.parameters.model_dump(exclude_none=True) if body.parameters else {}
        fields.update(body.model_dump(exclude_none=True, exclude={"text_input", "id", "parameters"}))
        lora = resolved[1] or fields.pop("lora", None)
        timeout = fields.pop("timeout", None)
        base, (rid,) = request_ids(body.id or request.headers.get("x-request-id"), 1)
        return model.stream(body.text_input, sampling_params(fields), rid, lora, timeout), base

    @router.post("/generate")
    async def generate(model_name: str, body: GenerateRequest, request: Request, response: Response):
        stream, base = prepare(model_name, body, request)
        results = await unless_disconnected(request, collect([stream]))
        if results is None:
            return Response(status_code=499)  # the client left; nobody reads this
        response.headers["x-request-id"] = base
        return _event(model_name, base, results[0], len(results[0].outputs[0].token_ids))

    @router.post("/generate_stream")
    async def generate_stream(model_name: str, body: GenerateRequest, request: Request):
        stream, base = prepare(model_name, body, request)
        first = await anext(stream)  # bad input raises here, before the response starts: a plain 400

        async def events():
            generated = 0
            try:
                async for delta in prepend(first, stream):
                    generated += len(delta.outputs[0].token_ids)
                    yield sse(_event(model_name, base, delta, generated))
            except Exception as e:  # the response has started: the error travels as an event
                yield sse({"error": str(e)})
            finally:
                await stream.aclose()

        return SSEResponse(events(), headers={"x-request-id": base})

    @router.get("/stats")
    async def stats(model_name: str):
        if model_name != model.name:
            raise ModelNotFound(model_name)
        if model.async_engine is None:
            raise ModelNotReady(model_name)
        return dataclasses.asdict(model.async_engine.stats())

    app.include_router(router)
