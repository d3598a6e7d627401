"""The Python API: load a model, pick a method, generate.

    >>> import paradecode as pd
    >>> model = pd.load_model()                     # the embedded SmolLM2-135M-Instruct
    >>> out = pd.generate(model, "Name three colours.", method="pld", chat=True)
    >>> out.text, out.stats.tokens_per_call
"""

from __future__ import annotations

import numbers
import re

import time
from typing import Any, Callable, Mapping, Sequence

from .decoding.sink import DecodeResult, TokenSink
from .errors import UserError
from .methods.base import Method, get_method
from .models.base import CausalLM
from .sampling import GenerationConfig, check_text

Prompt = str | list[dict] | list[int]
EMPTY_FIX = "give some text to continue (the CLI: --prompt, a file or stdin)"


def encode_prompt(model: CausalLM, prompt: Prompt, *, chat: bool = False) -> list[int]:
    """Text, chat messages or token ids -> prompt token ids (validated)."""
    tok = model.tokenizer
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError("the prompt is empty", EMPTY_FIX, field="prompt")
        check_text(prompt, "prompt", "the prompt")
        if tok is None:
            raise UserError("this model has no tokenizer", "use a model directory with its tokenizer.json "
                            "(the Python API and /v1/completions also take token ids)")
        if chat:
            if not getattr(tok, "chat_template", None):
                raise UserError("this model has no chat template", "drop --chat to use the prompt as plain text")
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=False)
            ids = tok.encode(ids, add_special_tokens=False)
        else:
            ids = tok.encode(prompt)
    else:
        ids = _messages_or_ids(model, prompt)
        if chat and not (prompt and isinstance(prompt[0], dict)):
            raise UserError("chat=True applies to text; token ids are used as they are", "drop chat=True",
                            field="chat")
    if not ids:
        raise UserError("the prompt is empty", EMPTY_FIX, field="prompt")
    return list(ids)


def _messages_or_ids(model: CausalLM, prompt) -> list[int]:
    """Token ids of a prompt given as chat messages or as token ids (a list, tensor or array)."""
    tok = model.tokenizer
    if hasattr(prompt, "tolist") and not isinstance(prompt, (list, tuple)):      # tensor or array of ids
        prompt = prompt.tolist()
    if not _is_messages_or_ids(prompt):
        raise UserError(f"a prompt must be text, a list of chat messages or a list of token ids, "
                        f"not {type(prompt).__name__}",
                        'pass "text", [{"role": "user", "content": "..."}] or [1, 2, 3]', field="prompt")
    if prompt and isinstance(prompt[0], dict):
        if tok is None or not getattr(tok, "chat_template", None):
            raise UserError("chat messages need a model with a chat template", "pass plain text instead")
        _check_messages(prompt, tok.chat_template)
        from jinja2 import TemplateError

        try:
            text = tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        except TemplateError as e:    # the template's own checks, e.g. roles that must alternate
            raise UserError(f"the model's chat template refused these messages: {e}",
                            "change the messages as it asks", field="messages") from None
        return tok.encode(text, add_special_tokens=False)
    ids = [int(t) for t in prompt]
    if any(t < 0 or t >= model.vocab_size for t in ids):
        raise UserError("prompt token id out of range", f"ids must be in [0, {model.vocab_size})", field="prompt")
    return ids


CHAT_ROLES = ("system", "user", "assistant", "tool")


def _check_messages(messages: Sequence[Mapping], template: str | Any) -> None:
    """Every message has a text ``content`` and a role the chat template knows.

    A template that renders roles generically (ChatML) would take any role, so a misspelt
    one would reach the model as given; roles beyond :data:`CHAT_ROLES` are taken only
    when the template names them (e.g. Llama 3's ``"ipython"``).
    """
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m.get("role"), str):
            raise UserError(f'{where} has no "role"', 'give every message a role such as "user"',
                            field="messages")
        if not isinstance(m.get("content"), str):
            got = type(m["content"]).__name__ if "content" in m else "nothing"
            raise UserError(f'{where} needs its "content" as text, got {got}',
                            'write it as {"role": "user", "content": "..."}', field="messages")
        check_text(m["content"], "messages", f"{where}'s content")
        for key in m:                   # keys the template never reads would be dropped without a word
            if key not in ("role", "content") and not re.search(rf"""\b{re.escape(str(key))}\b""", str(template)):
                raise UserError(f"{where} has the key {key!r}, which this model's chat template does not read",
                                f"remove {key!r} (messages take role and content)", field="messages")
        role = m["role"]
        if role not in CHAT_ROLES and not re.search(rf"""['"]{re.escape(role)}['"]""", str(template)):
            raise UserError(f"{where} has the role {role!r}, which this model's chat template does not know",
                            f"use one of {', '.join(CHAT_ROLES)}", field="messages")


def _is_messages_or_ids(prompt) -> bool:
    """A list of chat messages (dicts) or of token ids (integers, not bools)."""
    if not isinstance(prompt, (list, tuple)):
        return False
    return all(isinstance(p, dict) for p in prompt) or \
        all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in prompt)


def check_fits(model: CausalLM, n_prompt: int, gen: GenerationConfig) -> None:
    if n_prompt >= model.max_context:
        raise UserError(f"the prompt has {n_prompt} tokens, longer than the model's context window of "
                        f"{model.max_context}", "shorten the prompt", field="prompt")
    if n_prompt + gen.max_new_tokens > model.max_context:
        raise UserError(f"prompt ({n_prompt} tokens) + max new tokens ({gen.max_new_tokens}) exceed the context "
                        f"window of {model.max_context}",
                        "lower max new tokens (--max-new-tokens, max_new_tokens) to at most "
                        f"{model.max_context - n_prompt}", field="max_new_tokens")


def _make_gen(gen: GenerationConfig | None, kw: Mapping[str, Any]) -> GenerationConfig:
    if gen is not None and kw:
        raise TypeError("pass either gen=GenerationConfig(...) or keyword settings, not both")
    if gen is not None and not isinstance(gen, GenerationConfig):
        raise TypeError(f"gen must be a GenerationConfig, not {type(gen).__name__} (or pass its fields as keywords)")
    return gen if gen is not None else GenerationConfig(**kw)


def _check_call(model, options, **callbacks) -> None:
    """What the Python API's caller passed is of the right kind, said before any work (not deep inside it)."""
    if not isinstance(model, CausalLM) and not (hasattr(model, "forward") and hasattr(model, "info")):
        raise TypeError(f"model must be a loaded model (paradecode.load_model(...)), not {type(model).__name__}")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options must be a mapping such as {{'max_ngram': 3}}, not {type(options).__name__}")
    for name, f in callbacks.items():
        if f is not None and not callable(f):
            raise TypeError(f"{name} must be a callable or None, not {type(f).__name__}")


def generate(model: CausalLM, prompt: Prompt, method: str | Method = "plain",
             options: Mapping[str, Any] | None = None, *, chat: bool = False,
             gen: GenerationConfig | None = None, stream: Callable[[str], None] | None = None,
             trace: bool = False, cancel: Callable[[], bool] | None = None, **settings) -> DecodeResult:
    """Generate a continuation of ``prompt`` with ``method``.

    ``settings`` are :class:`GenerationConfig` fields (``max_new_tokens``,
    ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``). ``stream``
    receives text pieces as tokens are accepted. ``trace=True`` records what
    each model call proposed and accepted (for ``paradecode viz``).
    ``cancel`` (e.g. a ``threading.Event``'s ``is_set``) is asked after every
    model call; once it answers True the decode ends with the tokens accepted
    so far and ``finish_reason == "cancelled"``.
    """
    _check_call(model, options, stream=stream, cancel=cancel)
    g = _make_gen(gen, settings)
    m = get_method(method, options)
    ids = encode_prompt(model, prompt, chat=chat)
    check_fits(model, len(ids), g)
    sink = _sink(model, g, m, stream, trace)
    sink.cancel = cancel
    t0 = time.perf_counter()
    m.decode(model, ids, g, sink)
    sink.stats.wall_time = time.perf_counter() - t0
    return sink.result(ids)


def generate_batch(model: CausalLM, prompts: Sequence[Prompt], method: str | Method = "plain",
                   options: Mapping[str, Any] | None = None, *, chat: bool = False,
                   gen: GenerationConfig | None = None, **settings) -> list[DecodeResult]:
    """Generate for several prompts (batched where the method supports it)."""
    _check_call(model, options)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of prompts, not {type(prompts).__name__} (one prompt: generate())")
    g = _make_gen(gen, settings)
    m = get_method(method, options)
    if not prompts:
        raise UserError("no prompts given", "pass at least one prompt")
    all_ids = [encode_prompt(model, p, chat=chat) for p in prompts]
    for ids in all_ids:
        check_fits(model, len(ids), g)
    sinks = [_sink(model, g, m, None, False) for _ in all_ids]
    m.decode_batch(model, all_ids, g, sinks)
    return [s.result(ids) for s, ids in zip(sinks, all_ids)]


def _sink(model: CausalLM, g: GenerationConfig, m: Method, stream, trace: bool) -> TokenSink:
    sink = TokenSink(gen=g, eos_token_ids=g.eos_token_ids if g.eos_token_ids is not None else model.info.eos_token_ids,
                     tokenizer=model.tokenizer, on_text=stream, trace=[] if trace else None)
    sink.stats.method = m.name
    return sink
