"""Sampling parameters as the KServe v2 and generate protocols carry them.

One table names every parameter these protocols accept, its Python type and its v2 tensor datatype. It drives
the v2 model metadata, the generate routes' request schema and the coercion of loosely typed values (gRPC
carries only bools, int64s and strings; tensors carry numpy scalars) into SamplingParams, whose own checks
then decide the ranges. Every problem becomes kserve's InvalidInput: 400 over REST, INVALID_ARGUMENT over gRPC.
"""
import math
import re
import struct
import uuid
from typing import Any

import numpy as np
from pydantic import ConfigDict, create_model

from kserve.errors import InvalidInput
from kvserve.runtime.sampling_params import SamplingParams

# name -> (python type, v2 datatype). List-valued parameters take the whole tensor as the list.
SAMPLING_PARAMS: dict[str, tuple[type, str]] = {
    "max_tokens": (int, "INT32"),
    "min_tokens": (int, "INT32"),
    "temperature": (float, "FP32"),
    "top_p": (float, "FP32"),
    "top_k": (int, "INT32"),
    "min_p": (float, "FP32"),
    "seed": (int, "INT64"),
    "repetition_penalty": (float, "FP32"),
    "presence_penalty": (float, "FP32"),
    "frequency_penalty": (float, "FP32"),
    "ignore_eos": (bool, "BOOL"),
    "stop": (list[str], "BYTES"),
    "stop_token_ids": (list[int], "INT32"),
    "include_stop_str_in_output": (bool, "BOOL"),
    "skip_special_tokens": (bool, "BOOL"),
}
LIST_PARAMS = {name for name, (typ, _) in SAMPLING_PARAMS.items() if typ in (list[str], list[int])}

# Request parameters that clients and KServe use for transport, not sampling (timeout is the deadline).
TRANSPORT_PARAMS = {"binary_data_output", "binary_data", "binary_data_size", "stream", "headers",
                    "triton_enable_empty_final_response", "sequence_id", "sequence_start", "sequence_end",
                    "priority", "timeout"}
# Request parameters that route a request rather than shape its sampling: the LoRA adapter to run.
ROUTING_PARAMS = {"lora"}

# The generate extension's schema for the same parameters (top level and under "parameters").
SamplingFields = create_model(
    "SamplingFields",
    __config__=ConfigDict(extra="forbid"),
    **{name: ((str | list[str] if name == "stop" else typ) | None, None)
       for name, (typ, _) in SAMPLING_PARAMS.items()},
)


_KINDS = {bool: "a boolean", int: "an integer", float: "a finite number",
          list[str]: "a string or a list of strings", list[int]: "a list of integers"}


def _coerce(name: str, value: Any) -> Any:
    typ = SAMPLING_PARAMS[name][0]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = utf8(value, name)
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif typ == list[str]:
        items = value if isinstance(value, (list, tuple)) else [value]
        items = [utf8(v, name) if isinstance(v, bytes) else v for v in items]
        if all(isinstance(v, str) for v in items):
            return items
    elif typ == list[int]:
        items = value if isinstance(value, (list, tuple)) else [value]
        items = [v.item() if isinstance(v, np.generic) else v for v in items]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return items
    raise InvalidInput(f"parameter '{name}' must be {_KINDS[typ]}, got {value!r}")


def utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{what} is not valid UTF-8: {e}") from None


def check_names(names, where: str) -> None:
    """Reject parameters nobody reads: a typo like 'max_token' must not be silently ignored."""
    unknown = sorted(set(names) - set(SAMPLING_PARAMS) - TRANSPORT_PARAMS - ROUTING_PARAMS)
    if unknown:
        raise InvalidInput(f"unknown {where} {', '.join(map(repr, unknown))}; "
                           f"known: {', '.join(SAMPLING_PARAMS)}")


def sampling_params(fields: dict[str, Any]) -> SamplingParams:
    """SamplingParams from protocol values (already named after vLLM); None means 'default'."""
    kwargs = {k: _coerce(k, v) for k, v in fields.items() if k in SAMPLING_PARAMS and v is not None}
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise InvalidInput(str(e)) from None


def grpc_parameter(param) -> Any:
    """The value of a gRPC InferParameter, including the double and uint64 kinds that Triton's protocol (and
    so tritonclient) sends but KServe's proto lacks: they arrive as unknown fields 4 (fixed64) and 5 (varint)."""
    kind = param.WhichOneof("parameter_choice")
    if kind is not None:
        return getattr(param, kind)
    from google.protobuf.unknown_fields import UnknownFieldSet

    for f in UnknownFieldSet(param):
        if f.field_number == 4 and f.wire_type == 1:
            return struct.unpack("<d", f.data.to_bytes(8, "little"))[0]
        if f.field_number == 5 and f.wire_type == 0:
            return f.data
    return None


def plain_parameters(params) -> dict[str, Any]:
    """Request parameters as a plain dict, whether they came as JSON (REST) or as a protobuf map (gRPC)."""
    if not params:
        return {}
    return {k: grpc_parameter(v) if hasattr(v, "WhichOneof") else v for k, v in params.items()}


def request_ids(base: str | None, count: int) -> tuple[str, list[str]]:
    """The id a response echoes and one engine request id per prompt. Clients may reuse ids (proxies retry
    with the same X-Request-Id), so engine ids carry a random suffix to stay unique."""
    base = base or uuid.uuid4().hex
    if not _REQUEST_ID.fullmatch(base):  # it goes back in a header, where other characters break the response
        raise InvalidInput(f"request id must be 1 to 256 printable ASCII characters (it is echoed as X-Request-Id), "
                           f"got {base[:40]!r}")
    return base, [f"{base}-{i}-{uuid.uuid4().hex[:8]}" for i in range(count)]


_REQUEST_ID = re.compile(r"[ -~]{1,256}")
