"""What a decode cost: the statistics every method returns with its output."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass
class DecodeStats:
    """Cost of one decode (one request).

    ``accepted_lengths[i]`` is how many tokens target call ``i`` produced
    (accepted draft tokens + the recovered/bonus token); plain decoding has
    all ones. The prefill call that encodes the prompt is counted in
    ``model_calls`` but produces no accepted length of its own beyond the first
    token, which it records like any other call.
    """

    method: str = "plain"
    prompt_tokens: int = 0
    new_tokens: int = 0
    model_calls: int = 0          # target-model forward passes (NFE), prefill included
    draft_calls: int = 0          # forward passes of a draft model / skipped-layer draft
    accepted_lengths: list[int] = field(default_factory=list)
    draft_tokens: int = 0         # tokens proposed by the drafter in total
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    wall_time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    # -- derived -----------------------------------------------------------
    @property
    def other_time(self) -> float:
        return max(0.0, self.wall_time - self.prefill_time - self.draft_time - self.verify_time)

    @property
    def decode_calls(self) -> int:
        return len(self.accepted_lengths)

    @property
    def tokens_per_call(self) -> float:
        """Mean accepted tokens per target call (MAT), prefill excluded."""
        n = len(self.accepted_lengths)
        return sum(self.accepted_lengths) / n if n else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the prompt was encoded."""
        t = self.wall_time - self.prefill_time
        return self.new_tokens / t if t > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens that were accepted."""
        if not self.draft_tokens:
            return 0.0
        accepted = sum(max(0, a - 1) for a in self.accepted_lengths)
        return accepted / self.draft_tokens

    def accepted_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.accepted_lengths).items()))

    # -- recording ---------------------------------------------------------
    def record_call(self, produced: int) -> None:
        self.accepted_lengths.append(int(produced))

    @contextmanager
    def timing(self, what: str) -> Iterator[None]:
        """Add the time spent in the block to ``<what>_time``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            attr = f"{what}_time"
            setattr(self, attr, getattr(self, attr) + time.perf_counter() - t0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "model_calls": self.model_calls,
            "draft_calls": self.draft_calls,
            "tokens_per_call": round(self.tokens_per_call, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "accepted_histogram": self.accepted_histogram(),
            "draft_tokens": self.draft_tokens,
            "time": {
                "wall": round(self.wall_time, 6),
                "prefill": round(self.prefill_time, 6),
                "draft": round(self.draft_time, 6),
                "verify": round(self.verify_time, 6),
                "other": round(self.other_time, 6),
            },
            **({"extra": self.extra} if self.extra else {}),
        }

    def summary(self) -> str:
        return (
            f"{self.method}: {self.new_tokens} tokens in {self.wall_time:.2f}s "
            f"({self.tokens_per_s:.1f} tok/s), {self.model_calls} model calls, "
            f"{self.tokens_per_call:.2f} tokens/call; time draft {self.draft_time:.2f}s, "
            f"verify {self.verify_time:.2f}s, prefill {self.prefill_time:.2f}s, other {self.other_time:.2f}s"
        )
