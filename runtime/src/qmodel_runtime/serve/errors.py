"""OpenAI-style error bodies, and the handlers that make every failure one of them.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` with a 4xx status for
anything the client can fix; a 500 would only come from a bug, and even then has this shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qmodel_runtime.serve.protocol import ErrorInfo, ErrorResponse, UnsupportedField

log = logging.getLogger(__name__)

TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorInfo(message=message, type=TYPES.get(status, "server_error"), param=param, code=code)
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _field(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages.0.content' (None for the body itself)."""
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "constrained-str"}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first error in user terms: 'temperature: Input should be ... (got -1)'."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    param = _field(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        return f"{param} is required", param
    if first.get("type") == "extra_forbidden":
        return f"unknown field {param!r}: it is not part of this API", param
    got = first.get("input")
    shown = repr(got) if not isinstance(got, dict | list) or len(repr(got)) < 80 else type(got).__name__
    where = f"{param}: " if param else "request body: "
    return f"{where}{first['msg']} (got {shown})", param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(UnsupportedField)
    async def _unsupported(_: Request, exc: UnsupportedField):
        return error_response(400, str(exc), exc.param, "unsupported_parameter")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = "no such endpoint; see /docs for the API"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unexpected error while serving a request")
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")
