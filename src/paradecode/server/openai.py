"""OpenAI-compatible endpoints, so existing clients and tools can talk to paradecode.

    GET  /v1/models             the one loaded model
    POST /v1/chat/completions   chat messages -> an assistant message ("stream": true: chunks, then [DONE])
    POST /v1/completions        a text prompt (or token ids) -> its continuation

The decoding method is chosen with two fields of our own, ``method`` and ``options``
(the official client sends them with ``extra_body``); ``top_k`` is taken too. Every
answer carries the decode's cost under ``"paradecode"``. The defaults are OpenAI's:
``temperature`` 1 (sampling; 0 is greedy), ``max_tokens`` up to the context window for
chat and 16 for completions. Fields paradecode cannot honour (``n`` > 1, penalties,
``logprobs``, ``tools``, ...) are refused with an error rather than ignored, so an answer
never silently differs from what was asked. Errors use OpenAI's shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": null, "fix": "..."}}
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import UserError
from .common import check_paths, start_stream
from .streaming import EventStream, run_unless_disconnected

COMPLETION_TOKENS = 16      # OpenAI's max_tokens for completions when none (or null) is sent
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}   # the last: nobody reads it


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ChatMessage(_Strict):
    role: str
    content: str | list[dict[str, Any]]         # text, or OpenAI's content parts

    def as_dict(self, i: int) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role     # OpenAI's newer name for the system role
        if isinstance(self.content, str):
            return {"role": role, "content": self.content}
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UserError(f"message {i} has a content part of type {part.get('type')!r}; "
                                "this model reads text only", 'send parts as {"type": "text", "text": "..."}',
                                field="messages")
            if set(part) - {"type", "text"}:
                extra = sorted(set(part) - {"type", "text"})[0]
                raise UserError(f"message {i} has a content part with {extra!r}, which paradecode does not take",
                                f"remove {extra!r} from the part", field="messages")
        return {"role": role, "content": "".join(p["text"] for p in self.content)}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What both endpoints share: OpenAI's sampling fields and paradecode's method."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = 1.0             # null, as OpenAI takes it: the default
    top_p: float | None = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None  # taken only empty: a bias would change the distribution
    user: str | None = None                     # metadata: does not change the answer
    method: str = Field("plain", description="paradecode's decoding method")
    options: dict[str, Any] = Field(default_factory=dict, description="the method's options")
    top_k: int = 0

    @model_validator(mode="after")
    def _nulls_are_defaults(self):
        for name in ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty"):
            if getattr(self, name) is None:
                setattr(self, name, type(self).model_fields[name].default)
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # what apps send as defaults: taken when they ask for the default, refused otherwise
    store: bool | None = None                   # this server keeps nothing
    tool_choice: str | None = None              # "none" only: no tools here
    response_format: dict[str, Any] | None = None   # {"type": "text"} only


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = COMPLETION_TOKENS  # OpenAI's default for completions (null too)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


def _refuse_unsupported(req: _Sampling) -> None:
    for name, default_only, what in (
            ("logit_bias", not req.logit_bias, "a logit bias would change the model's distribution"),
            ("store", not getattr(req, "store", None), "this server stores no completions"),
            ("tool_choice", getattr(req, "tool_choice", None) in (None, "none"), "this server has no tools"),
            ("response_format", (getattr(req, "response_format", None) or {"type": "text"}).get("type") == "text",
             "only text answers are made here")):
        if not default_only:
            raise UserError(f"{name} is not supported: {what}", f"leave {name} out", field=name)
    if req.n != 1:
        raise UserError(f"n={req.n}: paradecode returns one choice per request", "send n=1 (or leave it out)",
                        field="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise UserError(f"{name} is not supported: it would change the model's distribution",
                            f"leave {name} at 0", field=name)
    if getattr(req, "best_of", None) not in (None, 1):
        raise UserError("best_of is not supported", "leave best_of out", field="best_of")
    logprobs = getattr(req, "logprobs", None)
    if logprobs is not None and logprobs is not False:
        raise UserError("logprobs are not supported", "leave logprobs out", field="logprobs")
    if getattr(req, "top_logprobs", None) is not None:
        raise UserError("top_logprobs are not supported", "leave top_logprobs out", field="top_logprobs")
    if getattr(req, "echo", False):
        raise UserError("echo is not supported", "leave echo out; the prompt is the one you sent", field="echo")
    if getattr(req, "suffix", None) is not None:
        raise UserError("suffix (fill in the middle) is not supported", "leave suffix out", field="suffix")
    if req.stream_options is not None and not req.stream:
        raise UserError("stream_options is only taken with stream: true", "leave stream_options out, or stream",
                        field="stream_options")


def add_openai_routes(app: FastAPI, model, decode: Callable, draft_models: tuple[str, ...] = ()) -> None:
    """Register the endpoints; ``decode(prompt, method, gen, cancel, stream=None)`` runs one request under
    the server's lock (None when ``cancel`` was set while it queued); ``draft_models`` as ``create_app``'s."""
    from ..api import encode_prompt
    from ..methods import get_method
    from ..sampling import GenerationConfig

    name = model.info.name
    created = int(time.time())

    def check_model(req: _Sampling) -> None:
        if req.model is not None and req.model != name:
            raise UserError(f"model {req.model!r} is not served here; this server serves {name!r}",
                            f'send "model": "{name}" (GET /v1/models lists it)', field="model",
                            status=404)

    def prepare(req: _Sampling, prompt, *, chat: bool, max_tokens: int | None):
        check_model(req)
        _refuse_unsupported(req)
        method = get_method(req.method, req.options, strict=True)
        check_paths(req.options, draft_models)
        ids = encode_prompt(model, prompt, chat=chat)
        room = model.max_context - len(ids)
        if room <= 0:
            raise UserError(f"the prompt has {len(ids)} tokens, as long as or longer than the model's context "
                            f"window of {model.max_context}", "shorten the prompt",
                            field="messages" if chat else "prompt")
        limit_field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None \
            else "max_tokens"
        if max_tokens is not None and not 0 < max_tokens <= room:
            raise UserError(f"{limit_field}={max_tokens}: it must be at least 1 and fit the context window "
                            f"({len(ids)} prompt tokens of {model.max_context})",
                            f"send {limit_field} between 1 and {room}, or leave it out", field=limit_field)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        gen = GenerationConfig(max_new_tokens=room if max_tokens is None else max_tokens,
                               temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                               stop=stop)
        return ids, method, gen

    def usage(out) -> dict[str, int]:
        n_prompt, n_new = len(out.prompt_ids), len(out.token_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}

    def ours(out) -> dict[str, Any]:
        return {"method": out.stats.method, "stats": out.stats.to_dict()}

    async def respond(request: Request, req: _Sampling, ids: list[int], method, gen,
                      full: Callable[[Any], dict], chunk: Callable[[dict | None], dict], first: dict | None):
        """The whole answer (``full(out)`` plus usage and stats), or its stream of ``chunk(part)`` events and
        ``[DONE]``. Either way the decode stops when the client disconnects."""
        cancel = threading.Event()
        if not req.stream:
            out = await run_unless_disconnected(request, lambda: decode(ids, method, gen, cancel), cancel)
            if out is None or out.finish_reason == "cancelled":
                return Response(status_code=499)            # the client is gone
            return {**full(out), "usage": usage(out), "paradecode": ours(out)}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def run(on_text):
            return decode(ids, method, gen, cancel, stream=on_text)

        refused, start, rest = await start_stream(request, run, cancel)
        if refused is not None:
            return refused

        async def body():
            async with contextlib.aclosing(rest):
                if first is not None:
                    yield _data(chunk(first))
                kind, data = start
                while True:
                    if kind == "text":
                        yield _data(chunk({"text": data}))
                    elif kind == "error":
                        kind_ = "server_error" if data["type"] == "internal_error" else "invalid_request_error"
                        yield _data({"error": {"message": data["message"], "type": kind_,
                                               "param": data.get("field"), "code": None,
                                               **({"fix": data["fix"]} if data.get("fix") else {})}})
                        break
                    else:
                        if data is not None:
                            yield _data({**chunk({"finish": FINISH[data.finish_reason]}), "paradecode": ours(data)})
                            if include_usage:
                                yield _data({**chunk(None), "choices": [], "usage": usage(data)})
                        break
                    kind, data = await anext(rest)
            yield "data: [DONE]\n\n"

        return EventStream(body(), cancel)

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "paradecode"}]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str):
        if model_id != name:
            raise UserError(f"model {model_id!r} is not served here; this server serves {name!r}",
                            "GET /v1/models lists it", field="model", status=404)
        return {"id": name, "object": "model", "created": created, "owned_by": "paradecode"}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise UserError("max_tokens and max_completion_tokens disagree", "send one of them",
                            field="max_completion_tokens")
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if not req.messages:
            raise UserError("messages is empty", 'send at least one message, e.g. {"role": "user", ...}',
                            field="messages")
        ids, method, gen = prepare(req, [m.as_dict(i) for i, m in enumerate(req.messages)], chat=True, max_tokens=limit)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def full(out) -> dict:
            return {"id": cid, "object": "chat.completion", "created": now, "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                                 "logprobs": None, "finish_reason": FINISH[out.finish_reason]}]}

        def chunk(part: dict | None) -> dict:
            c = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": name}
            if part is None:
                return c
            delta = {k: v for k, v in (("role", part.get("role")), ("content", part.get("text"))) if v is not None}
            return {**c, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": part.get("finish")}]}

        return await respond(request, req, ids, method, gen, full, chunk, {"role": "assistant", "text": ""})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise UserError(f"{len(prompt)} prompts in one request: paradecode answers one at a time",
                                "send one request per prompt", field="prompt")
            prompt = prompt[0]
        limit = COMPLETION_TOKENS if req.max_tokens is None else req.max_tokens     # null: OpenAI's default
        ids, method, gen = prepare(req, prompt, chat=False, max_tokens=limit)
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def full(out) -> dict:
            return {"id": cid, "object": "text_completion", "created": now, "model": name,
                    "choices": [{"index": 0, "text": out.text, "logprobs": None,
                                 "finish_reason": FINISH[out.finish_reason]}]}

        def chunk(part: dict | None) -> dict:
            c = {"id": cid, "object": "text_completion", "created": now, "model": name}
            if part is None:
                return c
            return {**c, "choices": [{"index": 0, "text": part.get("text", ""), "logprobs": None,
                                      "finish_reason": part.get("finish")}]}

        return await respond(request, req, ids, method, gen, full, chunk, None)


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"

