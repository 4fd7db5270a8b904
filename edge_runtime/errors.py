"""The edge's HTTP error vocabulary: one enum, one body shape, one mapping.

Every failure a client can see is an `ApiError` carrying an `ErrorKind`; the
server turns it into OpenAI's `{"error": {"message", "type", "param", "code"}}`
body in exactly one place (`error_body` / `http_status`), or into Ollama's
`{"error": message}` for the Ollama API under /api/ (`surface_of` says which a
path belongs to). Engine and config errors are FoglineErrors; `as_api_error`
maps those too, so handlers never build error JSON themselves.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

from fogline.errors import ConfigError, FoglineError


class ErrorKind(enum.Enum):
    """(HTTP status, OpenAI error type, code). Values are unique so no member aliases another."""

    INVALID_REQUEST = (400, "invalid_request_error", "invalid_request")
    CONTEXT_LENGTH_EXCEEDED = (400, "invalid_request_error", "context_length_exceeded")
    MODEL_NOT_FOUND = (400, "invalid_request_error", "model_not_found")  # a bad body field like any other
    UNAUTHORIZED = (401, "authentication_error", "invalid_api_key")
    NOT_FOUND = (404, "invalid_request_error", "not_found")
    METHOD_NOT_ALLOWED = (405, "invalid_request_error", "method_not_allowed")
    PAYLOAD_TOO_LARGE = (413, "invalid_request_error", "payload_too_large")
    RATE_LIMITED = (429, "rate_limit_error", "queue_full")  # the wait queue is full: retry later
    INTERNAL = (500, "server_error", "internal_error")
    UNAVAILABLE = (503, "server_error", "unavailable")  # still loading, or shutting down

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def type(self) -> str:
        return self.value[1]

    @property
    def code(self) -> str:
        return self.value[2]


class ApiError(FoglineError):
    """An error with an HTTP meaning. `recoverable`: the same request may succeed later."""

    def __init__(self, kind: ErrorKind, message: str, *, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.param = param
        self.retry_after = retry_after
        self.code = kind.code
        self.recoverable = kind in (ErrorKind.RATE_LIMITED, ErrorKind.UNAVAILABLE)


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(ErrorKind.INVALID_REQUEST, message, param=param)


def as_api_error(exc: BaseException) -> ApiError:
    """Map any exception to the ApiError a client sees (unknown ones are 500s)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ConfigError):
        return ApiError(ErrorKind.INVALID_REQUEST, str(exc))
    if isinstance(exc, FoglineError):
        kind = ErrorKind.UNAVAILABLE if exc.recoverable else ErrorKind.INTERNAL
        return ApiError(kind, f"{exc.code}: {exc}")
    return ApiError(ErrorKind.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


Surface = Literal["openai", "ollama"]


def surface_of(path: str) -> Surface:
    """The API a request path belongs to: its errors take that API's shape."""
    return "ollama" if path.startswith("/api/") else "openai"


def error_body(err: ApiError, surface: Surface = "openai") -> dict[str, Any]:
    if surface == "ollama":
        return {"error": str(err)}
    return {"error": {"message": str(err), "type": err.kind.type, "param": err.param, "code": err.code}}


def http_status(err: ApiError, surface: Surface = "openai") -> int:
    if surface == "ollama" and err.kind is ErrorKind.MODEL_NOT_FOUND:
        return 404  # Ollama answers an unknown model with 404; OpenAI treats it as a bad field
    return err.kind.status
