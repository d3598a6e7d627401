"""Prompt lookup decoding (PLD; Saxena 2023, "Prompt Lookup Decoding").

Training-free drafting for input-grounded tasks (summarisation, editing,
context QA): the last few generated tokens usually occurred earlier in the
prompt, and what followed them there is a good guess of what comes next.
The draft is deterministic (one-hot ``q``), verified by the shared loop, so
the method is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..decoding.speculative import Drafter, speculative_decode
from ..decoding.tree import Draft
from .base import Method, check, check_range, option, register


def prompt_lookup(tokens: list[int], max_ngram: int, min_ngram: int, num_draft: int) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of the context's last n-gram.

    Tries n = ``max_ngram`` down to ``min_ngram``; for the first n whose last
    n tokens occur earlier in ``tokens``, returns up to ``num_draft`` tokens
    that followed the most recent such occurrence. Returns ``[]`` when no
    n-gram matches. Invariant: the returned tokens are a contiguous slice of
    ``tokens`` that starts right after an occurrence of ``tokens[-n:]``
    ending before the last position.

    >>> prompt_lookup([5, 6, 7, 8, 9, 5, 6], max_ngram=3, min_ngram=1, num_draft=3)
    [7, 8, 9]

    Here ``[9, 5, 6]`` never occurred before, ``[5, 6]`` did (at 0); what
    followed it was ``7, 8, 9``. The most recent occurrence wins:

    >>> prompt_lookup([1, 2, 3, 1, 2, 4, 1, 2], max_ngram=2, min_ngram=1, num_draft=2)
    [4, 1]
    >>> prompt_lookup([1, 2, 3], max_ngram=2, min_ngram=1, num_draft=4)
    []
    """
    L = len(tokens)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        pattern = tokens[L - n:]
        first = pattern[0]
        for i in range(L - n - 1, -1, -1):          # most recent earlier start first
            if tokens[i] == first and tokens[i:i + n] == pattern:
                return tokens[i + n:i + n + num_draft]
    return []


class PromptLookupDrafter(Drafter):
    reads_logits = False

    def __init__(self, max_ngram: int, min_ngram: int, num_draft_tokens: int):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_nodes = num_draft_tokens

    def propose(self, context: list[int], max_nodes: int) -> Draft:
        return Draft.chain(prompt_lookup(context, self.max_ngram, self.min_ngram, min(max_nodes, self.max_nodes)))


@dataclass(frozen=True)
class PLDConfig:
    max_ngram: int = option(3, "longest n-gram of recent tokens to look up in prompt + output")
    min_ngram: int = option(1, "shortest n-gram tried before giving up (no draft this step)")
    num_draft_tokens: int = option(10, "tokens copied after the match (draft length)")
    backoff: bool = option(True, "fall back to plain steps while drafts are rejected or cost more per "
                                 "token than plain decoding")
    size_drafts: bool = option(True, "pick each call's draft budget for the most tokens per second expected from recent calls (with backoff)")

    def validate(self) -> None:
        check(self.min_ngram >= 1, "min_ngram", f"must be at least 1, got {self.min_ngram}", "use min_ngram=1")
        check(self.max_ngram >= self.min_ngram, "max_ngram",
              f"must be ≥ min_ngram ({self.min_ngram}), got {self.max_ngram}", "e.g. max_ngram=3 min_ngram=1")
        check_range(self.max_ngram, 1, 16, "max_ngram", 3)
        check_range(self.num_draft_tokens, 1, 64, "num_draft_tokens", 10)


@register
class PromptLookup(Method):
    name = "pld"
    Config = PLDConfig
    summary = "prompt lookup decoding: copy what followed the last n-gram's earlier occurrence (lossless)"
    family = "draft-and-verify"

    def decode(self, model, prompt_ids, gen, sink):
        c = self.config
        drafter = PromptLookupDrafter(c.max_ngram, c.min_ngram, c.num_draft_tokens)
        speculative_decode(model, drafter, prompt_ids, gen, sink, backoff=c.backoff, sizing=c.size_drafts)
