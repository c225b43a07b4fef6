"""The KServe predictor: one kserve.Model over one AsyncEngine, answering v2 infer over REST and gRPC.

The generate and OpenAI routes reach the same engine through `stream()`, which is where every protocol's
engine errors turn into the server's: bad input -> InvalidInput (400 / INVALID_ARGUMENT), dead engine or
draining server -> Unavailable (503 / UNAVAILABLE), too many waiting -> Overloaded (503 or 429 /
RESOURCE_EXHAUSTED), past the deadline -> RequestTimeout (504 / DEADLINE_EXCEEDED).
"""
import time
from contextlib import aclosing
from typing import AsyncIterator, Callable

import numpy as np
import orjson
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import deserialize_bytes_tensor

from kvserve.adapters.errors import Overloaded, RequestTimeout, Unavailable
from kvserve.adapters.guard import Limits, seconds
from kvserve.adapters.metrics import REJECTED
from kvserve.adapters.params import (LIST_PARAMS, SAMPLING_PARAMS, check_names, plain_parameters, request_ids,
                                     sampling_params, utf8)
from kvserve.adapters.streams import collect
from kvserve.runtime.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError, RequestTimeoutError
from kvserve.runtime.config import EngineConfig
from kvserve.runtime.outputs import RequestOutput
from kvserve.runtime.sampling_params import SamplingParams


class KVServeModel(Model):
    def __init__(self, name: str, config: EngineConfig, served_names: list[str] | None = None,
                 stat_loggers: list[Callable] = ()):
        super().__init__(name, return_response_headers=True)
        self.config = config
        # Names the OpenAI routes answer to; the first is the one /models lists first.
        self.served_names = list(dict.fromkeys([*(served_names or []), name]))
        self.stat_loggers = list(stat_loggers)
        self.limits = Limits()  # per-request limits and the default deadline (the CLI sets its flags')
        self.draining = False  # SIGTERM: not ready, new requests refused, running ones finish
        self.async_engine: AsyncEngine | None = None
        self.created = int(time.time())
        self.engine = True  # kserve: ModelServer awaits start_engine() on its event loop

    # -- lifecycle ------------------------------------------------------------------------------------
    def load(self) -> bool:
        # The dataplane calls load() again on a model that is not ready: never build a second engine.
        if self.async_engine is None:
            self.async_engine = AsyncEngine(self.config, stat_loggers=self.stat_loggers)
        self.ready = True
        return True

    async def start_engine(self):
        self.async_engine.start()
        self.ready = True

    def stop_engine(self):
        self.ready = False
        if self.async_engine is not None:
            self.async_engine.shutdown()
        for logger in self.stat_loggers:  # an unloaded model leaves no stale series behind
            getattr(logger, "close", lambda: None)()

    async def healthy(self) -> bool:
        return self.ready and not self.draining and self.async_engine is not None and not self.async_engine.errored

    def live(self) -> bool:
        """False once the engine loop died: only a restart brings it back."""
        return self.async_engine is None or not self.async_engine.errored

    @property
    def tokenizer(self):
        return self.async_engine.tokenizer

    # -- the one way into the engine ------------------------------------------------------------------
    def adapters(self) -> list[str]:
        """Names of the LoRA adapters loaded into the engine."""
        if self.async_engine is None or not self.config.max_loras:
            return []
        return [info.name for info in self.async_engine.list_loras()]

    def resolve(self, name: str | None) -> tuple[str, str | None] | None:
        """A requested model name -> (the name to answer with, the adapter to run); None if unknown."""
        if name is None:
            return self.served_names[0], None
        if name in self.served_names:
            return name, None
        if name in self.adapters():
            return name, name
        return None

    async def stream(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                     lora: str | None = None, timeout=None) -> AsyncIterator[RequestOutput]:
        """`timeout`: the request's own deadline in seconds, as the protocol carried it (None: the default)."""
        if not await self.healthy():
            REJECTED.labels(self.name, "unavailable").inc()
            raise Unavailable(self.name, "the server is shutting down" if self.draining
                              else _dead_detail(self.async_engine))
        timeout = self.limits.check(params, timeout)
        async with aclosing(self.async_engine.generate(prompt, params, request_id, lora, timeout)) as gen:
            started = False
            try:
                async for delta in gen:
                    started = True
                    yield delta
            except EngineDeadError as e:
                REJECTED.labels(self.name, "unavailable").inc()
                raise Unavailable(self.name, f"the engine stopped: {e}") from None
            except EngineOverloadedError as e:
                REJECTED.labels(self.name, "overloaded").inc()
                raise Overloaded(str(e)) from None
            except RequestTimeoutError as e:
                REJECTED.labels(self.name, "deadline").inc()
                raise RequestTimeout(str(e)) from None
            except ValueError as e:
                if started:  # the engine validates before its first output; later errors are its own bugs
                    raise
                raise InvalidInput(str(e)) from None

    # -- KServe v2 ------------------------------------------------------------------------------------
    def get_input_types(self) -> list[dict]:
        optional = [{"name": n, "datatype": dt, "shape": [-1]} for n, (_, dt) in SAMPLING_PARAMS.items()]
        return [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}, *optional]

    def get_output_types(self) -> list[dict]:
        return [{"name": "text_output", "datatype": "BYTES", "shape": [-1]},
                {"name": "finish_reason", "datatype": "BYTES", "shape": [-1]}]

    async def predict(self, payload: InferRequest, headers: dict | None = None,
                      response_headers: dict | None = None, lora: str | None = None) -> InferResponse:
        """`lora`: the adapter whose name the request addressed; otherwise the `lora` request parameter."""
        if not isinstance(payload, InferRequest):
            raise InvalidInput("this model speaks the v2 protocol: POST /v2/models/{name}/infer")
        prompts, fields, request_params = v2_request(payload)
        lora = lora or request_params.get("lora")
        if lora is not None and not isinstance(lora, str):
            raise InvalidInput(f"parameter 'lora' must be an adapter name (a string), got {lora!r}")
        params = [sampling_params(f) for f in fields]
        base, ids = request_ids(payload.id or (headers or {}).get("x-request-id"), len(prompts))
        timeout = request_params.get("timeout")  # Triton's unit: microseconds
        timeout = None if timeout is None else seconds(timeout, 1e-6)
        results = await collect([self.stream(p, sp, rid, lora, timeout) for p, sp, rid in zip(prompts, params, ids)])
        outputs = [_bytes_output("text_output", [r.outputs[0].text for r in results]),
                   _bytes_output("finish_reason", [r.outputs[0].finish_reason or "" for r in results])]
        if response_headers is not None:
            response_headers["x-request-id"] = base
        return InferResponse(response_id=base, model_name=self.name, infer_outputs=outputs,
                             use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)


def _bytes_output(name: str, texts: list[str]) -> InferOutput:
    out = InferOutput(name=name, shape=[len(texts)], datatype="BYTES")
    # binary: gRPC carries it as raw_output_contents; REST turns it back into JSON strings unless asked not to
    out.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=True)
    return out


def _dead_detail(engine: AsyncEngine | None) -> str | None:
    if engine is not None and engine.dead_error is not None:
        return f"the engine stopped: {engine.dead_error!r}"
    return None


def _values(inp) -> list:
    try:
        return inp.as_numpy().reshape(-1).tolist()
    except InvalidInput:
        raise
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"input '{inp.name}' ({inp.datatype}, shape {list(inp.shape)}) "
                           f"does not hold matching data: {e}") from None


def v2_request(req: InferRequest) -> tuple[list[str], list[dict], dict]:
    """The prompts of a v2 request and, per prompt, its sampling fields: request parameters, overridden by
    input tensors of the same names (one value for all prompts, or one per prompt); and the request parameters
    themselves (routing and transport ones too)."""
    names = [i.name for i in req.inputs]
    if len(set(names)) != len(names):
        raise InvalidInput(f"inputs must have distinct names, got {names}")
    text = req.get_input_by_name("text_input")
    if text is None:
        raise InvalidInput("missing input 'text_input' (BYTES, one prompt per element)")
    if text.datatype != "BYTES":
        raise InvalidInput(f"input 'text_input' must have datatype BYTES, got {text.datatype}")
    prompts = [utf8(v, "text_input") if isinstance(v, bytes) else str(v) for v in _values(text)]
    if not prompts:
        raise InvalidInput("input 'text_input' holds no prompts")
    params = plain_parameters(req.parameters)
    check_names(params, "parameter(s)")
    fields = [dict(params) for _ in prompts]
    for inp in req.inputs:
        if inp.name == "text_input":
            continue
        if inp.name not in SAMPLING_PARAMS:
            raise InvalidInput(f"unexpected input '{inp.name}'; inputs are text_input and the optional "
                               f"{', '.join(SAMPLING_PARAMS)}")
        values = _values(inp)
        if inp.name in LIST_PARAMS:
            per_prompt = [values] * len(prompts)
        elif len(values) == 1:
            per_prompt = values * len(prompts)
        elif len(values) == len(prompts):
            per_prompt = values
        else:
            raise InvalidInput(f"input '{inp.name}' has {len(values)} elements: give 1, or one per prompt "
                               f"({len(prompts)})")
        for f, v in zip(fields, per_prompt):
            f[inp.name] = v
    return prompts, fields, params


class V2DataPlane(DataPlane):
    """KServe's, except for REST requests with binary BYTES tensors that are not valid UTF-8: KServe decodes
    those to text before the model sees them and answers a failure with 500; this answers 400 naming the input."""

    def decode_inference_request(self, body, headers, model_name):
        try:
            return super().decode_inference_request(body, headers, model_name)
        except InferenceError as e:
            if not isinstance(e.__context__, UnicodeDecodeError):
                raise
            raise InvalidInput(f"input '{_undecodable(body, headers)}' is not valid UTF-8: {e.__context__}") from None


def _undecodable(body: bytes, headers: dict) -> str:
    """The name of the first binary BYTES input of a REST request that is not valid UTF-8."""
    start = length = int(headers[INFERENCE_CONTENT_LENGTH_HEADER])
    for spec in orjson.loads(body[:length])["inputs"]:
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is None:
            continue
        raw, start = body[start:start + size], start + size
        if spec.get("datatype") == "BYTES":
            try:
                [v.decode() for v in deserialize_bytes_tensor(raw)]
            except UnicodeDecodeError:
                return spec["name"]
    return "?"
