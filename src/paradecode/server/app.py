"""The paradecode HTTP API.

    GET  /health           liveness and the loaded model
    GET  /v1/methods       registered methods with their options
    POST /v1/generate      one prompt (text or chat messages), one method -> text, token ids, stats
                           ("stream": true answers with server-sent events, one per text piece)
    GET  /v1/models, POST /v1/chat/completions, POST /v1/completions
                           OpenAI-compatible (:mod:`paradecode.server.openai`)

Every bad request gets a JSON error object and the server keeps serving::

    {"error": {"type": "invalid_request", "message": "...", "fix": "...", "field": "top_p"}}
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Sequence

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from .common import check_paths, error_response, start_stream
from .openai import add_openai_routes
from .streaming import EventStream, run_unless_disconnected

_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}
MAX_BODY = 4 << 20      # bytes a request body may have (a full context window of text is ~40 KB)


class _Strict(BaseModel):
    """Unknown fields are refused and JSON types are taken as they are ("2" is no number, 1 no boolean)."""
    model_config = ConfigDict(extra="forbid", strict=True)


class Message(_Strict):
    role: str
    content: str


class GenerateRequest(_Strict):
    prompt: str | None = Field(None, description="plain text prompt (or give messages)")
    messages: list[Message] | None = Field(None, description="chat messages; implies the chat template")
    chat: bool = Field(False, description="wrap a text prompt in the model's chat template")
    method: str = "plain"
    options: dict[str, Any] = Field(default_factory=dict, description="method options")
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stream: bool = False


def create_app(model, *, api_key: str | None = None, draft_models: Sequence[str] = ()) -> FastAPI:
    """An app serving ``model`` (a loaded CausalLM). One decode runs at a time. With ``api_key``, every
    request but ``GET /health`` must carry ``Authorization: Bearer <api_key>`` (what OpenAI clients send).
    ``draft_models``: the paths a request's ``draft_model`` option may name (none by default)."""
    from ..api import check_fits, encode_prompt, generate
    from ..methods import all_methods, get_method, method_options
    from ..sampling import GenerationConfig, check_sampling_given

    app = FastAPI(title="paradecode", version="0.1.0")
    lock = threading.Lock()  # the CPU does one decode at a time; requests queue here
    draft_models = tuple(draft_models)

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        return error_response(e.status, "invalid_request", e.problem, e.fix, e.field, request=request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":       # its location is a character offset, not a field
            where = first.get("loc", ("body", "?"))[-1]
            return error_response(422, "invalid_request", f"the body is not valid JSON (at character {where})",
                          'send a JSON object such as {"prompt": "..."} with content-type application/json',
                          request=request)
        # the request's own path (messages.0.content), without pydantic's union branches (stop.str, prompt.list[int])
        field = ".".join(str(x) for x in first.get("loc", ())
                         if x != "body" and not (isinstance(x, str) and (x in _TYPE_NAMES or "[" in x))) or None
        fix = f"paradecode does not take {field}; remove it" if first.get("type") == "extra_forbidden" \
            else "see GET /docs for the request schema"
        return error_response(422, "invalid_request", f"{field or 'body'}: {first.get('msg', 'invalid request')}",
                      fix, field, request=request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return error_response(404, "not_found", f"there is no {request.url.path}",
                          "GET /docs lists the routes", request=request)
        if e.status_code == 405:
            return error_response(405, "method_not_allowed", f"{request.url.path} does not take {request.method}",
                          "GET /docs lists each route's methods", request=request)
        type_ = "invalid_request" if 400 <= e.status_code < 500 else "internal_error"
        return error_response(e.status_code, type_, str(e.detail),
                      "send a JSON object with content-type application/json" if e.status_code == 400 else None,
                      request=request)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return error_response(500, "internal_error", f"{type(e).__name__}: {e}", request=request)

    @app.api_route("/health", methods=["GET", "HEAD"])
    def health():
        i = model.info
        return {"status": "ok", "model": i.name, "backend": i.backend, "dtype": i.dtype,
                "max_context": i.max_context}

    @app.get("/v1/methods")
    def methods():
        return [{"name": n, "lossless": c.lossless, "family": c.family, "summary": c.summary,
                 "options": json.loads(json.dumps(method_options(c), default=str))}
                for n, c in all_methods().items()]

    def prepare(req: GenerateRequest):
        if req.messages and "chat" in req.model_fields_set and not req.chat:
            raise UserError("chat is false, but messages always take the chat template",
                            'drop "chat", or send a plain "prompt"', field="chat")
        if req.prompt is None and not req.messages:
            raise UserError("give a prompt or messages", 'send {"prompt": "..."} or {"messages": [...]}',
                            field="prompt")
        if req.prompt is not None and req.messages:
            raise UserError("give either prompt or messages, not both", "drop one of them", field="prompt")
        gen = GenerationConfig(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                               top_p=req.top_p, seed=req.seed, stop=tuple(req.stop))
        check_sampling_given(gen, {f for f in req.model_fields_set
                                   if getattr(req, f) != GenerateRequest.model_fields[f].default})
        method = get_method(req.method, req.options, strict=True)
        check_paths(req.options, draft_models)
        prompt = [m.model_dump() for m in req.messages] if req.messages else req.prompt
        ids = encode_prompt(model, prompt, chat=req.chat)       # every check before a stream starts
        check_fits(model, len(ids), gen)
        return ids, method, gen

    def decode(prompt, method, gen, cancel: threading.Event, *, stream=None):
        """One decode under the lock; None when the client left while the request queued."""
        with lock:
            if cancel.is_set():
                return None
            return generate(model, prompt, method, gen=gen, stream=stream, cancel=cancel.is_set)

    @app.post("/v1/generate")
    async def generate_endpoint(req: GenerateRequest, request: Request):
        prompt, method, gen = prepare(req)   # before a stream starts, so errors are proper error objects
        cancel = threading.Event()
        if not req.stream:
            out = await run_unless_disconnected(
                request, lambda: decode(prompt, method, gen, cancel), cancel)
            if out is None or out.finish_reason == "cancelled":
                return Response(status_code=499)            # the client is gone
            return {**out.to_dict(), "prompt_tokens": len(out.prompt_ids), "model": model.info.name}

        def run(on_text):
            return decode(prompt, method, gen, cancel, stream=on_text)

        refused, first, rest = await start_stream(request, run, cancel)
        if refused is not None:
            return refused

        async def events():
            async with contextlib.aclosing(rest):
                kind, data = first
                while not (kind == "done" and data is None):            # None: cancelled, nobody to tell
                    yield f"event: {kind}\ndata: {json.dumps(data.to_dict() if kind == 'done' else data)}\n\n"
                    if kind in ("done", "error"):
                        return
                    kind, data = await anext(rest)

        return EventStream(events(), cancel)

    add_openai_routes(app, model, decode, draft_models)
    app.add_middleware(_Gate, api_key=api_key)
    return app


class _Gate:
    """What every request passes before its route, in plain ASGI (an ``@app.middleware`` wraps ``receive``
    and hides a client's disconnect from the endpoints that stop decoding on it):

    * with an API key, ``Authorization: Bearer <key>`` (``GET /health`` stays open), else 401;
    * a body in plain UTF-8: another ``Content-Encoding`` or charset gets 415;
    * at most :data:`MAX_BODY` bytes, else 413: at once by its content-length, else (a chunked body) as soon
      as it grows past the limit. (FastAPI's own ``max_body_size`` answers in plain text.)
    """

    def __init__(self, app, api_key: str | None = None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            return await error_response(*refusal, request=request)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:             # FastAPI passes an HTTPException on to the handler above
                    raise HTTPException(413, f"the request body has more than the {MAX_BODY} bytes this "
                                             "server takes")
            return message

        await self.app(scope, counted, send)

    def _refusal(self, request: Request) -> tuple | None:
        import hmac

        h = request.headers
        if self.expected is not None and request.url.path != "/health":
            given = h.get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                what = "a wrong API key" if given else "no API key"
                return (401, "authentication_error", f"the request has {what}",
                        "send the header Authorization: Bearer <the key given to serve --api-key>")
        encoding = h.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            return (415, "invalid_request", f"the body is sent with Content-Encoding {encoding}, which this "
                    "server does not decode", "send the JSON body uncompressed")
        charset = h.get("content-type", "").lower().partition("charset=")[2].split(";")[0].strip().strip('"')
        if charset not in ("", "utf-8", "utf8"):
            return (415, "invalid_request", f"the body is in {charset}; this server reads UTF-8",
                    "send the JSON body as UTF-8 (content-type: application/json)")
        size = h.get("content-length", "")
        if size and (not size.isdigit() or int(size) > MAX_BODY):
            return (413, "invalid_request", f"the request body has {size} bytes, more than the {MAX_BODY} this "
                    "server takes", "send a shorter prompt")
        return None
