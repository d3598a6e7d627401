"""What the server's two APIs share: their error objects, and what a request may make the server read."""

from __future__ import annotations

from typing import Any, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..errors import UserError
from .streaming import first_event

OPENAI_PATHS = ("/v1/models", "/v1/chat/completions", "/v1/completions")


def is_openai_path(path: str) -> bool:
    """An OpenAI-compatible route, whose errors take OpenAI's shape (``/v1/models/<id>`` too)."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def openai_error(status: int, type_: str, message: str, fix: str | None, field: str | None) -> JSONResponse:
    """OpenAI's error object (clients read its ``message``), with our ``fix`` beside it. Bad requests are
    400 as OpenAI answers them, a model that is not served 404."""
    code = None
    if type_ == "invalid_request":
        type_ = "invalid_request_error"
        if status == 422:               # a body that does not fit the schema: 400, as OpenAI answers it
            status = 400
        if status == 404 and field == "model":
            code = "model_not_found"
    elif type_ == "internal_error":
        type_ = "server_error"
    elif type_ == "authentication_error":
        code = "invalid_api_key"
    body = {"message": message, "type": type_, "param": field, "code": code}
    if fix:
        body["fix"] = fix
    return JSONResponse(status_code=status, content={"error": body})


def error_response(status: int, type_: str, message: str, fix: str | None = None, field: str | None = None, *,
                   request: Request | None = None) -> JSONResponse:
    """The error object of the route ``request`` went to: OpenAI's shape on its routes, paradecode's own
    (``{"error": {"type", "message", "fix", "field"}}``) elsewhere."""
    if request is not None and is_openai_path(request.url.path):               # OpenAI's shape there
        return openai_error(status, type_, message, fix, field)
    body = {"type": type_, "message": message}
    if fix:
        body["fix"] = fix
    if field:
        body["field"] = field
    return JSONResponse(status_code=status, content={"error": body})


def stream_error(data: dict, request: Request) -> JSONResponse:
    """The error a stream's decode raised before its first piece, as the error object of its route."""
    status = 400 if data["type"] == "invalid_request" else 500
    return error_response(status, data["type"], data["message"], data.get("fix"), data.get("field"),
                          request=request)


def check_paths(options: dict[str, Any], allowed: Sequence[str]) -> None:
    """Clients may not make the server read files of their choosing: a draft model must be one the
    server was started with (``serve --draft-model PATH``)."""
    path = options.get("draft_model")
    if path is not None and path not in allowed:
        listed = ", ".join(allowed) if allowed else "none"
        raise UserError(f"this server does not load draft_model {path!r}: it loads only the draft models it "
                        f"was started with ({listed})",
                        "name one of those, or ask the operator to start the server with --draft-model PATH",
                        field="draft_model")


async def start_stream(request: Request, run, cancel):
    """``(None, first, rest)`` when the decode streams (see :func:`first_event`); ``(response, None, None)`` when
    it failed before its first piece (the route's error object) or its client left while it queued (499)."""
    first, rest = await first_event(request, run, cancel)
    if first[0] == "error":
        return stream_error(first[1], request), None, None
    if first == ("done", None):
        return Response(status_code=499), None, None
    return None, first, rest
