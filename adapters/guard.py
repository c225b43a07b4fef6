"""Who and what gets in: the API key (HTTP and gRPC), the size of request bodies, and the per-request limits
(`n`, stop lists, deadlines). The checks live here; the app, the gRPC server and `KVServeModel.stream` call them.

Health, metrics and the OpenAPI schema stay open unless asked otherwise: probes and Prometheus scrapers carry
no key. Keys are compared in constant time.
"""
import hmac
import math
import re
from dataclasses import dataclass

import grpc
from kserve.errors import InvalidInput
from starlette.responses import JSONResponse

from kvserve.adapters.errors import OpenAIError
from kvserve.runtime.sampling_params import SamplingParams

_DOCS = re.compile(r"^/(openapi\.json|docs|docs/oauth2-redirect|redoc)$")
_HEALTH = re.compile(r"^/$|^/v2/health/(live|ready)$|^/v2/models/[^/]+(/versions/[^/]+)?/ready$")
_METRICS = re.compile(r"^/metrics$|^/v2/models/[^/]+/stats$")
_GRPC_HEALTH = {f"/inference.GRPCInferenceService/{m}" for m in ("ServerLive", "ServerReady", "ModelReady")}
_OPENAI = ("/openai/", "/v1/")


@dataclass
class Guard:
    api_key: str | None = None
    protect_health: bool = False  # also require the key on liveness and readiness
    protect_metrics: bool = False  # also require the key on /metrics and the stats route
    max_request_bytes: int = 16 << 20

    def authorized(self, header: str | bytes | None) -> bool:
        """`header`: the Authorization header's (or metadata's) value."""
        if not self.api_key:
            return True
        raw = header.encode() if isinstance(header, str) else header or b""
        scheme, _, token = raw.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key.encode())

    def open_path(self, path: str) -> bool:
        return bool(_DOCS.match(path) or (not self.protect_health and _HEALTH.match(path))
                    or (not self.protect_metrics and _METRICS.match(path)))

    def open_method(self, method: str) -> bool:
        return not self.protect_health and method in _GRPC_HEALTH


@dataclass
class Limits:
    max_n: int = 16
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string
    request_timeout: float | None = None  # the deadline of requests that set none, and the longest one may set

    def check(self, params: SamplingParams, timeout=None) -> float | None:
        """Refuse what is over the limits (InvalidInput: 400 / INVALID_ARGUMENT); return the request's
        deadline in seconds, None for none."""
        if params.n > self.max_n:
            raise InvalidInput(f"n must be at most {self.max_n}, got {params.n}")
        if len(params.stop) > self.max_stop:
            raise InvalidInput(f"stop may hold at most {self.max_stop} strings, got {len(params.stop)}")
        long = next((s for s in params.stop if len(s) > self.max_stop_chars), None)
        if long is not None:
            raise InvalidInput(f"stop strings may be at most {self.max_stop_chars} characters, got one of {len(long)}")
        if timeout is not None:
            timeout = seconds(timeout)
        if self.request_timeout is not None:
            timeout = self.request_timeout if timeout is None else min(timeout, self.request_timeout)
        return timeout


def seconds(value, unit: float = 1.0) -> float:
    """A `timeout` as the protocols carry it (JSON number, gRPC int64 / double / string), counted in `unit`
    seconds, as seconds."""
    try:
        result = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        result = math.nan
    if not (math.isfinite(result) and result > 0):
        raise InvalidInput(f"timeout must be a number > 0, got {value!r}")
    return result * unit


def _error(path: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    if path.startswith(_OPENAI):
        return OpenAIError(status, message, headers=headers).response()
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class GuardMiddleware:
    """ASGI middleware in front of every HTTP route: the API key, then the body size (413). Bodies without a
    Content-Length are read here, counting, and handed on as read."""

    def __init__(self, app, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], dict(scope["headers"])
        if not self.guard.open_path(path) and \
                not self.guard.authorized(headers.get(b"authorization")):
            missing = b"authorization" not in headers
            message = ("missing API key: send it as 'Authorization: Bearer <key>'" if missing
                       else "invalid API key")
            return await _error(path, 401, message, {"www-authenticate": "Bearer"})(scope, receive, send)
        limit = self.guard.max_request_bytes
        length = headers.get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > limit:
                return await self._too_large(path, scope, receive, send)
        elif scope["method"] in ("POST", "PUT", "PATCH"):
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > limit:
                    return await self._too_large(path, scope, receive, send)
                more = message.get("more_body", False)
            receive = _replay(b"".join(chunks), receive)
        await self.app(scope, receive, send)

    async def _too_large(self, path, scope, receive, send):
        limit = self.guard.max_request_bytes
        await _error(path, 413, f"request body is larger than {limit} bytes (--max-request-bytes)")(
            scope, receive, send)


def _replay(body: bytes, receive):
    """The body read already, then the client's later messages (the disconnect that streams watch for)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <key>` metadata on every gRPC method but the health ones."""

    def __init__(self, guard: Guard):
        self.guard = guard

    async def intercept_service(self, continuation, details):
        if self.guard.open_method(details.method):
            return await continuation(details)
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if self.guard.authorized(header):
            return await continuation(details)
        return _DENY


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "missing or invalid API key: send metadata 'authorization: Bearer <key>'")

_DENY = grpc.unary_unary_rpc_method_handler(_deny)
