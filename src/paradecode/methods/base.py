"""The method registry: one small class per decoding method, one typed config each.

A method is registered with :func:`register`; the CLI, the server and the
benchmark enumerate :data:`REGISTRY` — nobody dispatches on method names.
Options arrive as strings (CLI ``-o key=value``) or JSON values (server) and
are converted and validated once, here, against the config dataclass.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping

from ..decoding.sink import TokenSink
from ..errors import UserError
from ..models.base import CausalLM
from ..sampling import GenerationConfig

REGISTRY: dict[str, type["Method"]] = {}


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """This method has no options."""


def option(default, help: str, **kw):
    """A config field with a help text (shown by `paradecode methods`)."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


class Method(ABC):
    """A decoding method. Subclasses set ``name``, ``Config``, ``lossless`` and ``summary``."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoOptions
    lossless: ClassVar[bool] = True      # greedy output identical to plain greedy; exact distribution when sampling
    summary: ClassVar[str] = ""
    family: ClassVar[str] = "autoregressive"   # baseline | draft-and-verify | jacobi | ...

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
        self.validate(self.config)

    @classmethod
    def validate(cls, config: Any) -> None:
        """Raise :class:`UserError` for an invalid config. Override to add checks."""
        check = getattr(config, "validate", None)
        if callable(check):
            check()

    @abstractmethod
    def decode(self, model: CausalLM, prompt_ids: list[int], gen: GenerationConfig, sink: TokenSink) -> None:
        """Generate into ``sink`` until ``sink.done``; record costs in ``sink.stats``."""

    def decode_batch(self, model: CausalLM, prompts: list[list[int]], gen: GenerationConfig,
                     sinks: list[TokenSink]) -> None:
        """Decode several prompts; the default runs them one after another."""
        for ids, sink in zip(prompts, sinks):
            self.decode(model, ids, gen, sink)


def register(cls: type[Method]) -> type[Method]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module in paradecode.methods so each registers itself."""
    import importlib
    import pkgutil

    from .. import methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "base":
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


def all_methods() -> dict[str, type[Method]]:
    _discover()
    return dict(sorted(REGISTRY.items()))


def method_options(cls: type[Method]) -> list[dict[str, Any]]:
    """Name, type, default and help of each option of a method."""
    hints = typing.get_type_hints(cls.Config)
    out = []
    for f in dataclasses.fields(cls.Config):
        out.append({"name": f.name, "type": _type_name(hints[f.name]), "default": f.default,
                    "help": f.metadata.get("help", "")})
    return out


def _type_name(tp) -> str:
    """How `paradecode methods` and GET /v1/methods show an option's type: its values for a Literal, ``path``
    for a model given by path or as a loaded model, ``X | None`` for an optional one."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        shown = "path" if any(getattr(a, "__name__", "") == "CausalLM" for a in args) else \
            " | ".join(_type_name(a) for a in args)
        return shown + (" | None" if len(args) < len(typing.get_args(tp)) else "")
    if origin in (tuple, list):
        return f"list of {_type_name((typing.get_args(tp) or (str,))[0])}"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(name: str, raw: Any, tp, strict: bool = False) -> Any:
    """``raw`` as the option's type. Text is parsed as the CLI's ``-o`` gives it ("3", "1,2", "true"), unless
    ``strict`` (JSON from the server, whose types are taken as they are); a boolean is never a number."""
    def wrong(kind: str, fix: str | None = None) -> UserError:
        return UserError(f"option {name}={raw!r} must be {kind}", fix or f"pass {kind} for {name}", field=name)

    text = isinstance(raw, str) and not strict
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw is None or (text and raw.lower() in ("none", "null", "")):
            return None
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        for a in allowed:               # numbers given as text (the CLI's -o) match by their spelling
            as_text = text and not isinstance(a, str) and raw == str(a)
            if as_text or (raw == a and type(raw) is type(a)):
                return a
        raise UserError(f"option {name}={raw!r} is not allowed", f"choose one of {', '.join(map(str, allowed))}",
                        field=name)
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(tp) or (str,)
        if text:                                     # the CLI's -o name=1,2,3 ("" is the empty list)
            items = [x.strip() for x in raw.split(",")] if raw.strip() else []
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            raise wrong("a list", f"pass a list such as [1, 2] (the CLI: -o {name}=1,2)")
        if any(x == "" for x in items):
            raise UserError(f"option {name}={raw!r} has an empty item", "remove the extra comma", field=name)
        return tuple(_convert(name, x, inner, strict) for x in items)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if text and raw.lower() in ("1", "true", "yes", "on"):
            return True
        if text and raw.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"option {name}={raw!r} is not a boolean", "use true or false", field=name)
    if tp is str:
        if not isinstance(raw, str):
            raise wrong("text")
        return raw
    if tp in (int, float):
        kind = "an integer" if tp is int else "a number"
        if isinstance(raw, bool):
            raise wrong(kind)
        if tp is int and isinstance(raw, numbers.Integral):          # numpy's integers too
            return int(raw)
        if tp is float and isinstance(raw, numbers.Real):
            return float(raw)
        if tp is int and isinstance(raw, float) and raw.is_integer() and not strict:
            return int(raw)
        if text:
            try:
                return tp(raw)
            except ValueError:
                pass
        raise wrong(kind, f"pass a whole number for {name}" if tp is int else None)
    return raw


def build_config(cls: type[Method], options: Mapping[str, Any] | None, strict: bool = False) -> Any:
    """Convert and validate user options into ``cls.Config`` (``strict``: JSON types as they are, see
    :func:`_convert`)."""
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    hints = typing.get_type_hints(cls.Config)
    unknown = [k for k in options if k not in fields]
    if unknown:
        allowed = ", ".join(fields) or "none"
        raise UserError(f"method {cls.name} has no option {unknown[0]!r}", f"its options are: {allowed}",
                        field=unknown[0])
    values = {k: _convert(k, v, hints[k], strict) for k, v in options.items()}
    try:
        config = cls.Config(**values)
    except UserError:
        raise
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid options for {cls.name}: {e}", "see `paradecode methods` for the options") from None
    cls.validate(config)
    return config


def get_method(name: str | Method, options: Mapping[str, Any] | None = None, *, strict: bool = False) -> Method:
    """A ready method instance from its name and user options (``strict``: options from JSON, whose types
    are taken as they are: "3" is no number there)."""
    if isinstance(name, Method):
        if options:
            raise ValueError("options are given with a method instance")
        return name
    if not isinstance(name, str):
        raise TypeError(f"method must be a method's name or a Method, not {type(name).__name__}")
    methods = all_methods()
    if name not in methods:
        raise UserError(f"unknown method {name!r}", f"choose one of: {', '.join(methods)}", field="method")
    cls = methods[name]
    return cls(build_config(cls, options, strict))


def check(cond: bool, field: str, problem: str, fix: str) -> None:
    """Config validation helper: raise a UserError naming the field."""
    if not cond:
        raise UserError(f"{field}: {problem}", fix, field=field)


def check_range(value, lo: int, hi: int, field: str, example) -> None:
    """An integer option must lie in lo..hi (inclusive); the fix suggests ``field=example``."""
    check(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi, field,
          f"must be an integer in {lo}..{hi}, got {value!r}", f"e.g. {field}={example}")
