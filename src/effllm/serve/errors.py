"""Errors as OpenAI returns them: `{"error": {"message", "type", "param", "code"}}` with the right status.

OpenAI clients raise a typed exception from the status (BadRequestError for 400, AuthenticationError for
401, NotFoundError for 404, RateLimitError for 429) and show `message`, so the message says what to fix.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from effllm.core.errors import EffLLMError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(EffLLMError):
    """An error the server answers with: a status, OpenAI's error type and code, and the offending field."""

    http_status = 400
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code


class AuthenticationError(APIError):
    http_status = 401
    code = "invalid_api_key"


class ModelNotFoundError(APIError):
    http_status = 404
    code = "model_not_found"


class PayloadTooLargeError(APIError):
    http_status = 413
    code = "request_too_large"


class QueueFullError(APIError):
    http_status = 429
    code = "queue_full"


class RequestTimeoutError(APIError):
    http_status = 408
    code = "timeout"


class ServerUnavailableError(APIError):
    http_status = 503
    code = "unavailable"


class EngineFailedError(APIError):
    http_status = 500
    code = "engine_error"


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def from_exception(exc: BaseException) -> JSONResponse:
    """The response for an exception raised while serving a request (unexpected ones become 500)."""
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, EffLLMError):
        status = getattr(exc, "http_status", 400)
        return error_response(status, str(exc), getattr(exc, "param", None), getattr(exc, "code", None))
    return error_response(500, "internal server error; see the server log", code="internal_error")


def from_validation_error(exc: ValidationError) -> JSONResponse:
    """400 naming the first invalid field, in words a client can act on."""
    first = _most_specific(exc.errors(include_url=False))
    loc = [str(part) for part in first.get("loc", ())]
    # A union reports each branch it tried (prompt.str, prompt.list[int]...); name the field itself.
    param = ".".join(part for part in loc if not _is_type_tag(part)) or None
    message = first.get("msg", "invalid request")
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if param:
        message = f"{param}: {message}"
    return error_response(400, message, param=param, code="invalid_value")


_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _most_specific(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Of the errors on the first invalid field, one that is not a mere type mismatch of a union branch
    (for prompt=[] the branch list[int] says "at least 1 item", the branch str says "not a string")."""
    field = _field(errors[0].get("loc", ()))
    same = [e for e in errors if _field(e.get("loc", ())) == field]
    specific = [e for e in same if e.get("type") not in _TYPE_NAMES]
    if specific:
        return specific[0]
    kinds = list(dict.fromkeys(_TYPE_NAMES[e["type"]] for e in same))
    if len(kinds) > 1:
        return {**same[0], "msg": f"Input should be {' or '.join(kinds)}", "loc": field}
    return same[0]


def _field(loc: tuple) -> tuple:
    """The location up to the first union branch tag: ('prompt', 'list[int]', 0) -> ('prompt',)."""
    for i, part in enumerate(loc):
        if _is_type_tag(str(part)):
            return tuple(loc[:i])
    return tuple(loc)


def _is_type_tag(part: str) -> bool:
    return (
        part in ("str", "int", "float", "bool", "list", "dict")
        or "[" in part
        or part.startswith("constrained-")
    )
