"""OpenAI's completions, chat completions and models routes on KServe's app, under /openai/v1 (KServe's
convention) and /v1 (where stock OpenAI clients look).

/v1/models belongs to KServe's v1 protocol, which lists models as {"models": [names]}. These routes are
registered first, so they answer it, with OpenAI's list shape plus KServe's "models" key: the OpenAI SDK and
KServe v1 clients both read what they expect. /v1/models/{m} likewise answers OpenAI's model object plus KServe's
{"name", "ready"}, and 503 while the model is not ready, as KServe's readiness route does.
"""
import functools
import logging
import time

from fastapi import APIRouter, FastAPI, Request, Response

from kvserve.adapters.errors import OpenAIError
from kvserve.adapters.openai_models import ChatCompletionRequest, CompletionRequest
from kvserve.adapters.params import SAMPLING_PARAMS, request_ids
from kvserve.adapters.predictor import KVServeModel
from kvserve.adapters.streams import SSEResponse, collect, merge, prepend, sse, unless_disconnected
from kvserve.runtime.outputs import CompletionOutput, RequestOutput
from kvserve.runtime.sampling_params import SamplingParams

log = logging.getLogger("kvserve.openai")

# max_tokens comes from max_tokens or max_completion_tokens, by route
_SAMPLING_FIELDS = [name for name in SAMPLING_PARAMS if name != "max_tokens"]
_MIN_LOGPROB = -9999.0  # JSON has no -Infinity


def _openai_errors(route):
    """Every failure of an OpenAI route leaves in OpenAI's error shape."""
    @functools.wraps(route)
    async def wrapper(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except Exception as e:
            err = OpenAIError.from_exception(e)
            if err.status == 500:  # bugs; 503, 504 and 429 are states of the server, not worth a traceback
                log.exception("OpenAI route failed")
            raise err from e
    return wrapper


class _Usage:
    """Token counts of a (possibly streamed) response: prompts counted once each, every generated token."""

    def __init__(self):
        self.prompts: dict[int, int] = {}
        self.completion = 0

    def add(self, i: int, delta: RequestOutput) -> None:
        self.prompts.setdefault(i, len(delta.prompt_token_ids))
        self.completion += sum(len(o.token_ids) for o in delta.outputs)

    def body(self) -> dict:
        prompt = sum(self.prompts.values())
        return {"prompt_tokens": prompt, "completion_tokens": self.completion,
                "total_tokens": prompt + self.completion}


def register_openai_routes(app: FastAPI, model: KVServeModel) -> None:
    def served_name(requested: str | None) -> tuple[str, str | None]:
        """The model name to answer with, and the LoRA adapter it names (None: the base model)."""
        resolved = model.resolve(requested)
        if resolved is None:
            raise OpenAIError(404, f"The model `{requested}` does not exist.", "model", "model_not_found")
        return resolved

    def sampling(body, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if body.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported", "logit_bias")
        extra = {k: getattr(body, k) for k in _SAMPLING_FIELDS if getattr(body, k) is not None}
        try:
            return SamplingParams(n=body.n, max_tokens=max_tokens, logprobs=logprobs, **extra)
        except ValueError as e:
            field = str(e).split()[0]
            raise OpenAIError(400, str(e), field if hasattr(body, field) else None) from None

    def token_text(token_id: int, lp) -> str:
        return lp.decoded_token if lp is not None and lp.decoded_token is not None else \
            model.tokenizer.decode([token_id])

    def completion_logprobs(o: CompletionOutput, offset: int) -> dict | None:
        if o.logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, alts in zip(o.token_ids, o.logprobs):
            tok = token_text(tid, alts.get(tid))
            out["tokens"].append(tok)
            out["token_logprobs"].append(max(alts[tid].logprob, _MIN_LOGPROB) if tid in alts else None)
            out["top_logprobs"].append({token_text(t, lp): max(lp.logprob, _MIN_LOGPROB) for t, lp in alts.items()})
            out["text_offset"].append(offset)
            offset += len(tok)
        return out

    def chat_logprobs(o: CompletionOutput, top: int) -> dict | None:
        if o.logprobs is None:
            return None

        def entry(t, lp):
            tok = token_text(t, lp)
            return {"token": tok, "logprob": max(lp.logprob, _MIN_LOGPROB), "bytes": list(tok.encode())}

        content = []
        for tid, alts in zip(o.token_ids, o.logprobs):
            best = sorted(alts.items(), key=lambda kv: kv[1].rank)[:top]
            item = entry(tid, alts[tid]) if tid in alts else {"token": token_text(tid, None), "logprob": None,
                                                              "bytes": None}
            content.append({**item, "top_logprobs": [entry(t, lp) for t, lp in best]})
        return {"content": content}

    async def run(request: Request, streams: list, stream: bool, on_delta, final_chunk):
        """Non-streaming: the accumulated outputs. Streaming: SSE of on_delta's chunks, final_chunk's, [DONE]."""
        if not stream:
            return await unless_disconnected(request, collect(streams))
        merged = merge(streams)
        first = await anext(merged)  # bad input raises here, before the response starts

        async def events():
            try:
                async for i, delta in prepend(first, merged):
                    for chunk in on_delta(i, delta):
                        yield sse(chunk)
                chunk = final_chunk()
                if chunk is not None:
                    yield sse(chunk)
            except Exception as e:  # the response has started: the error travels as an event
                err = OpenAIError.from_exception(e)
                if err.status == 500:
                    log.exception("OpenAI stream failed")
                yield sse(err.body())
            finally:
                await merged.aclose()
            yield b"data: [DONE]\n\n"

        return SSEResponse(events())

    @_openai_errors
    async def completions(body: CompletionRequest, request: Request, response: Response):
        name, lora = served_name(body.model)
        for field, ok in (("echo", not body.echo), ("suffix", body.suffix is None),
                          ("best_of", body.best_of in (None, body.n))):
            if not ok:
                raise OpenAIError(400, f"{field} is not supported", field)
        prompts = [body.prompt] if isinstance(body.prompt, str) or (
            body.prompt and isinstance(body.prompt[0], int)) else list(body.prompt)
        if not prompts:
            raise OpenAIError(400, "prompt must not be empty", "prompt")
        params = sampling(body, body.max_tokens, body.logprobs)
        base, ids = request_ids(request.headers.get("x-request-id"), len(prompts))
        streams = [model.stream(p, params, rid, lora, body.timeout) for p, rid in zip(prompts, ids)]
        head = {"id": f"cmpl-{base}", "object": "text_completion", "created": int(time.time()), "model": name}
        usage, offsets = _Usage(), {}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def choice(i: int, o: CompletionOutput) -> dict:
            index = i * body.n + o.index
            lp = completion_logprobs(o, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + sum(len(t) for t in (lp or {}).get("tokens", []))
            return {"index": index, "text": o.text, "logprobs": lp, "finish_reason": o.finish_reason,
                    "stop_reason": o.stop_reason}

        def on_delta(i: int, delta: RequestOutput):
            usage.add(i, delta)
            for o in delta.outputs:
                if o.text or o.finish_reason or o.logprobs:
                    yield {**head, "choices": [choice(i, o)], **({"usage": None} if include_usage else {})}

        def final_chunk():
            return {**head, "choices": [], "usage": usage.body()} if include_usage else None

        results = await run(request, streams, body.stream, on_delta, final_chunk)
        if not body.stream:
            if results is None:
                return Response(status_code=499)  # the client left; nobody reads this
            for i, r in enumerate(results):
                usage.add(i, r)
            choices = sorted((choice(i, o) for i, r in enumerate(results) for o in r.outputs),
                             key=lambda c: c["index"])
            response.headers["x-request-id"] = base
            return {**head, "choices": choices, "usage": usage.body()}
        results.headers["x-request-id"] = base
        return results

    @_openai_errors
    async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response):
        name, lora = served_name(body.model)
        if body.tools:
            raise OpenAIError(400, "tools are not supported", "tools")
        if body.response_format and body.response_format.get("type") != "text":
            raise OpenAIError(400, "only response_format {\"type\": \"text\"} is supported", "response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise OpenAIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
        top = body.top_logprobs or 0
        params = sampling(body, body.max_completion_tokens or body.max_tokens, top if body.logprobs else None)
        prompt = chat_prompt(body)
        base, (rid,) = request_ids(request.headers.get("x-request-id"), 1)
        head = {"id": f"chatcmpl-{base}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": name}
        usage, started = _Usage(), set()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def on_delta(i: int, delta: RequestOutput):
            usage.add(i, delta)
            for o in delta.outputs:
                message = {"content": o.text}
                if o.index not in started:
                    started.add(o.index)
                    message = {"role": "assistant", **message}
                elif not o.text and o.finish_reason is None and not o.logprobs:
                    continue
                yield {**head, "choices": [{"index": o.index, "delta": message,
                                            "logprobs": chat_logprobs(o, top), "finish_reason": o.finish_reason}],
                       **({"usage": None} if include_usage else {})}

        def final_chunk():
            return {**head, "choices": [], "usage": usage.body()} if include_usage else None

        results = await run(request, [model.stream(prompt, params, rid, lora, body.timeout)], body.stream,
                            on_delta, final_chunk)
        if not body.stream:
            if results is None:
                return Response(status_code=499)
            usage.add(0, results[0])
            choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                        "logprobs": chat_logprobs(o, top), "finish_reason": o.finish_reason,
                        "stop_reason": o.stop_reason} for o in results[0].outputs]
            response.headers["x-request-id"] = base
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage.body()}
        results.headers["x-request-id"] = base
        return results

    def chat_prompt(body: ChatCompletionRequest) -> list[int]:
        tok = model.tokenizer
        if not getattr(tok, "chat_template", None):
            raise OpenAIError(400, "this model has no chat template: use /completions", "messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=body.add_generation_prompt,
                                           **(body.chat_template_kwargs or {}))
        except Exception as e:  # jinja errors, raise_exception() in the template, bad kwargs
            raise OpenAIError(400, f"the chat template rejected the messages: {e}", "messages") from None
        # the template wrote the special tokens it wants; the tokenizer must not add more
        return tok(text, add_special_tokens=False)["input_ids"]

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": model.created, "owned_by": "kvserve",
                "root": str(model.config.model), "parent": None}
        if name in model.adapters():  # vLLM's shape: an adapter names its base model as parent
            info = next(i for i in model.async_engine.list_loras() if i.name == name)
            card.update(root=str(info.path), parent=model.served_names[0])
        return card

    @_openai_errors
    async def list_models():
        names = [model.served_names[0], *model.adapters()]
        return {"object": "list", "data": [model_card(n) for n in names], "models": [model.name, *model.adapters()]}

    @_openai_errors
    async def get_model(model_id: str):
        served_name(model_id)
        if not await model.healthy():
            raise OpenAIError(503, f"Model with name {model_id} is not ready.")
        return {**model_card(model_id), "name": model_id, "ready": True}

    for prefix in ("/openai/v1", "/v1"):
        router = APIRouter(prefix=prefix, tags=["openai"])
        router.add_api_route("/completions", completions, methods=["POST"], response_model=None)
        router.add_api_route("/chat/completions", chat_completions, methods=["POST"], response_model=None)
        router.add_api_route("/models", list_models, methods=["GET"])
        router.add_api_route("/models/{model_id}", get_model, methods=["GET"])
        app.include_router(router)
