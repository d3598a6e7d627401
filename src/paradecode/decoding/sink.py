"""Where accepted tokens go: stopping rules, streaming and the result.

Every method pushes the tokens it accepts into a :class:`TokenSink`; the sink
alone decides when generation ends (EOS, a stop string, the token budget), so
all methods stop at exactly the same token as plain decoding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..sampling import GenerationConfig
from ..stats import DecodeStats


@dataclass
class DecodeResult:
    """Text, ids and cost of one decode."""

    text: str
    token_ids: list[int]            # generated ids (EOS and stop strings excluded)
    prompt_ids: list[int]
    stats: DecodeStats
    finish_reason: str              # "eos" | "stop" | "length" | "cancelled"
    trace: list[dict] | None = None  # per-call record for the visualiser, when asked for

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats.to_dict()}


@dataclass
class TokenSink:
    gen: GenerationConfig
    eos_token_ids: tuple[int, ...]
    tokenizer: Any = None
    on_text: Callable[[str], None] | None = None   # streaming callback (new text pieces)
    cancel: Callable[[], bool] | None = None       # asked at every emit: True ends generation ("cancelled")
    stats: DecodeStats = field(default_factory=DecodeStats)
    trace: list[dict] | None = None                # set to [] to record per-call events
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    _streamed: str = ""
    _stop_cut: int | None = None      # where the text ends when a stop string was hit
    _live: "LiveText | None" = None   # the text so far, kept up to date for stop strings and streaming

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.gen.max_new_tokens - len(self.tokens)

    def emit(self, new: Iterable[int]) -> bool:
        """Append accepted tokens; return True once generation is over."""
        if self.cancel is not None and not self.done and self.cancel():
            self.finish_reason = "cancelled"      # the tokens of this call are not taken
            return True
        for t in new:
            if self.done:
                break
            t = int(t)
            if not self.gen.ignore_eos and t in self.eos_token_ids:
                self.finish_reason = "eos"
                break
            self.tokens.append(t)
            if len(self.tokens) >= self.gen.max_new_tokens:
                self.finish_reason = "length"
        if self.tokenizer is not None and (self.gen.stop or self.on_text is not None):
            if self._live is None:
                self._live = LiveText(self.tokenizer)
            before = self._live.update(self.tokens)
            if self.gen.stop:
                self._check_stop(before)
        self.stats.new_tokens = len(self.tokens)
        self._stream()
        return self.done

    def _check_stop(self, before: int) -> None:
        """End at the first stop string in the text; only text past its first ``before`` characters, which the
        previous emit's text held too, can begin one."""
        text = self._live.text
        hits = [i for i in (text.find(s, max(0, before - len(s) + 1)) for s in self.gen.stop) if i >= 0]
        if not hits:
            return
        cut = min(hits)
        # keep the shortest token prefix whose text reaches the stop string (a prefix's text grows with
        # it, so a binary search finds it); the text ends before the stop string
        lo, hi = 1, len(self.tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(self.tokens[:mid])) > cut:
                hi = mid
            else:
                lo = mid + 1
        self.tokens = self.tokens[:lo]
        self._stop_cut = cut
        self.finish_reason = "stop"

    def record(self, kind: str, proposed=None, accepted=None, **extra) -> None:
        """Record one model call for the trajectory visualiser (only when tracing).

        ``proposed``: the candidate tokens the call carried (a list, or a list
        of lists for several candidates/branches); ``accepted``: the tokens it
        produced; ``extra``: anything method-specific (probabilities, parents,
        Jacobi iterations), JSON-serialisable.
        """
        if self.trace is not None:
            self.trace.append({"call": len(self.trace), "kind": kind, "proposed": proposed,
                               "accepted": accepted, "position": len(self.tokens), **extra})

    def text(self) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.tokens)
        return text[:self._stop_cut] if self._stop_cut is not None else text

    def _stream(self) -> None:
        if self.on_text is None or self.tokenizer is None:
            return
        if self.done:
            text = self.text()
        else:
            # hold back a multi-byte character cut in half, and any tail that may begin a stop string
            text = self._live.text
            if text.endswith("\ufffd"):
                return
            text = text[:len(text) - _stop_prefix_len(text, self.gen.stop)]
        if text.startswith(self._streamed) and len(text) > len(self._streamed):
            self.on_text(text[len(self._streamed):])
            self._streamed = text

    def result(self, prompt_ids: list[int]) -> DecodeResult:
        return DecodeResult(text=self.text(), token_ids=list(self.tokens), prompt_ids=list(prompt_ids),
                            stats=self.stats, finish_reason=self.finish_reason or "length", trace=self.trace)


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string.

    >>> _stop_prefix_len("Hello wor", ("world",))
    3
    """
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class LiveText:
    """The text of a growing token list, decoded as it grows.

    With a ``tokenizers`` tokenizer the new tokens go through its incremental
    decoder (:class:`tokenizers.decoders.DecodeStream`): each emit costs the
    new tokens, not the whole answer, and the text equals a full decode except
    that a character still cut in half is held back. Other tokenizers decode
    the whole list every time.
    """

    def __init__(self, tokenizer):
        self.text = ""
        self._tokenizer = tokenizer
        self._fed = 0
        self._stream = None
        backend = getattr(tokenizer, "backend", None)
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(skip_special_tokens=True)

    def update(self, tokens: list[int]) -> int:
        """Bring the text up to ``tokens``; return how many leading characters of the previous text stand."""
        old = self.text
        if self._stream is not None:
            if len(tokens) > self._fed:
                try:
                    piece = self._stream.step(self._backend, tokens[self._fed:])
                except Exception:
                    # the decoder rewrote text it had given (byte fallback turns a lone byte it showed into
                    # U+FFFD once the next bytes prove it invalid): no stream follows that, so decode in full
                    self._stream = None
                else:
                    self._fed = len(tokens)
                    self.text += piece or ""
            if self._stream is not None:
                return len(old)
        self.text = self._tokenizer.decode(tokens)
        return len(os.path.commonprefix([old, self.text]))
