"""Where accepted tokens go: stopping rules, streaming and the result.

Every method pushes the tokens it accepts into a :class:`TokenSink`; the sink
alone decides when generation ends (EOS, a stop string, the token budget), so
all methods stop at exactly the same token as plain decoding.
"""

from __future__ import annotations

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
        if self.gen.stop and self.tokenizer is not None:
            self._check_stop()
        self.stats.new_tokens = len(self.tokens)
        self._stream()
        return self.done

    def _check_stop(self) -> None:
        text = self.tokenizer.decode(self.tokens)
        hits = [i for i in (text.find(s) for s in self.gen.stop) if i >= 0]
        if not hits:
            return
        cut = min(hits)
        # keep the shortest token prefix whose text reaches the stop string; the text ends before it
        for n in range(1, len(self.tokens) + 1):
            if len(self.tokenizer.decode(self.tokens[:n])) > cut:
                self.tokens = self.tokens[:n]
                break
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
        text = self.text()
        if not self.done:
            # hold back a multi-byte character cut in half, and any tail that may begin a stop string
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
