"""Error bodies for the routes kvserve adds to KServe's app.

KServe answers its own errors as {"error": "message"}; the generate routes keep that shape. The OpenAI routes
answer {"error": {"message", "type", "param", "code"}} as OpenAI's API does, so the SDK raises its typed errors.
Request bodies that fail schema validation get 400 (not FastAPI's 422) with the field named in the message.
"""
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc_interceptor import exceptions as grpc_errors
from grpc_interceptor.exceptions import DeadlineExceeded, ResourceExhausted
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady

OPENAI_PREFIXES = ("/openai/v1/", "/v1/completions", "/v1/chat/", "/v1/models")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error", 503: "server_error",
          504: "timeout"}
RETRY_AFTER = "1"  # seconds an overloaded server asks clients to wait


class Unavailable(grpc_errors.Unavailable):
    """The engine stopped or the server is draining: 503 on every HTTP route, UNAVAILABLE over gRPC. Not KServe's
    ModelNotReady: its gRPC interceptor fails on that one (the client sees UNKNOWN), and its handlers log a
    traceback per refused request, where the cause deserves one line, once."""

    def __init__(self, model_name: str, detail: str | None = None):
        super().__init__(f"Model with name {model_name} is not ready." + (f" {detail}" if detail else ""))

    def __str__(self):
        return self.details


class Overloaded(ResourceExhausted):
    """Too many requests wait. 503 + Retry-After on the v2 and generate routes, 429 on the OpenAI routes,
    RESOURCE_EXHAUSTED over gRPC (KServe's interceptor turns grpc_interceptor's exceptions into statuses)."""

    def __str__(self):
        return self.details


class RequestTimeout(DeadlineExceeded):
    """A request ran past its `timeout`: 504 on every HTTP route, DEADLINE_EXCEEDED over gRPC."""

    def __str__(self):
        return self.details


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    @classmethod
    def from_exception(cls, e: Exception) -> "OpenAIError":
        if isinstance(e, OpenAIError):
            return e
        if isinstance(e, ModelNotFound):
            return cls(404, str(e), "model", "model_not_found")
        if isinstance(e, (ModelNotReady, Unavailable)):
            return cls(503, str(e))
        if isinstance(e, Overloaded):
            return cls(429, str(e), code="rate_limit_exceeded", headers={"retry-after": RETRY_AFTER})
        if isinstance(e, RequestTimeout):
            return cls(504, str(e), code="timeout")
        if isinstance(e, (InvalidInput, ValueError)):
            return cls(400, str(e))
        return cls(500, f"internal error: {type(e).__name__}: {e}")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _describe(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first_param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')} "
                         f"at character {loc[0] if loc else '?'}")
            param = None
        elif err.get("type") == "extra_forbidden":
            parts.append(f"unrecognized request argument supplied: {param}")
        else:
            parts.append(f"{param or 'body'}: {err.get('msg', 'invalid')}")
        first_param = first_param or param
    return "; ".join(parts) or "invalid request body", first_param


async def _validation_error(request: Request, exc: RequestValidationError):
    message, param = _describe(exc)
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type and request.method == "POST":
        message = f"request body must be JSON (Content-Type: application/json, got {content_type}); {message}"
    if request.url.path.startswith(OPENAI_PREFIXES):
        return OpenAIError(400, message, param).response()
    return JSONResponse({"error": message}, status_code=400)


async def _openai_error(request: Request, exc: OpenAIError):
    return exc.response()


# The server's states, in KServe's shape on the v2 and generate routes: (status, headers)
_STATES = {Unavailable: (503, None), Overloaded: (503, {"retry-after": RETRY_AFTER}), RequestTimeout: (504, None)}


async def _server_state(request: Request, exc: Exception):
    if request.url.path.startswith(OPENAI_PREFIXES):
        return OpenAIError.from_exception(exc).response()
    status, headers = next(v for kind, v in _STATES.items() if isinstance(exc, kind))
    return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OpenAIError, _openai_error)
    for kind in _STATES:
        app.add_exception_handler(kind, _server_state)
