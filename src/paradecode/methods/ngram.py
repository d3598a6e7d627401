"""Adaptive N-gram Parallel Decoding (ANPD; Ou et al. 2024, "Lossless Acceleration of
Large Language Model via Adaptive N-gram Parallel Decoding").

A multi-level n-gram module is built online from the prompt and updated with
every committed token: for each order k (``min_order`` .. ``max_order``) it
maps the k preceding tokens to the tokens seen next, with counts. The longest
order whose key matches the context drafts (multi-level back-off). Unlike
PLD's single continuation, the ``num_branches`` most frequent next tokens
each start a branch, extended greedily to ``depth`` tokens by the same
module, and all branches are verified at once as a token tree. Deterministic
drafts, so the shared verifier keeps the method lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..decoding.speculative import Drafter, speculative_decode
from ..decoding.tree import Draft
from .base import Method, check, check_range, option, register


class NgramModule:
    """Multi-level n-gram tables: ``table[key tuple][next token] = [count, last position]``.

    All orders share one dict; a key's length is its order.
    """

    def __init__(self, min_order: int, max_order: int):
        self.min_order, self.max_order = min_order, max_order
        self.table: dict[tuple[int, ...], dict[int, list[int]]] = {}
        self.indexed = 0          # tokens[:indexed] have been added as "next" tokens

    def update(self, tokens: list[int]) -> None:
        """Add every n-gram that ends at a position not indexed yet."""
        for j in range(max(self.indexed, 1), len(tokens)):
            nxt = tokens[j]
            for k in range(self.min_order, min(self.max_order, j) + 1):
                entry = self.table.setdefault(tuple(tokens[j - k:j]), {}).setdefault(nxt, [0, 0])
                entry[0] += 1
                entry[1] = j
        self.indexed = max(self.indexed, len(tokens))

    def predict(self, context: list[int], n: int) -> list[int]:
        """Up to ``n`` distinct next tokens, longest matching order first.

        Within an order, tokens are ranked by count, then by recency; lower
        orders top the list up when the longest one has fewer than ``n``.

        >>> m = NgramModule(1, 2)
        >>> m.update([1, 2, 3, 9, 2, 4, 1, 2, 3])
        >>> m.predict([7, 1, 2], 2)      # order 2: (1, 2) -> 3 twice; order 1: (2,) -> 3, 4
        [3, 4]
        >>> m.predict([7, 5], 2)         # nothing matches
        []
        """
        out: list[int] = []
        for k in range(min(self.max_order, len(context)), self.min_order - 1, -1):
            nexts = self.table.get(tuple(context[len(context) - k:]))
            if not nexts:
                continue
            ranked = sorted(nexts.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))
            out.extend(t for t, _ in ranked if t not in out)
            if len(out) >= n:
                break
        return out[:n]


def ngram_tree(module: NgramModule, context: list[int], num_branches: int, depth: int) -> Draft:
    """A tree of ``num_branches`` chains below the root, each ``depth`` tokens at most.

    Branch b starts with the b-th ranked next token and continues with the
    module's top prediction. Branches are listed one after another (the best
    first), so truncating the draft keeps the most likely chain whole.
    """
    tokens: list[int] = []
    parents: list[int] = []
    for first in module.predict(context, num_branches):
        chain = [first]
        while len(chain) < depth:
            nxt = module.predict(context + chain, 1)
            if not nxt:
                break
            chain.append(nxt[0])
        start = len(tokens)
        tokens.extend(chain)
        parents.extend([-1] + list(range(start, start + len(chain) - 1)))
    return Draft(tokens, parents)


class NgramDrafter(Drafter):
    reads_logits = False     # learns from the committed tokens only

    def __init__(self, min_order: int, max_order: int, num_branches: int, depth: int):
        self.min_order, self.max_order = min_order, max_order
        self.num_branches, self.depth = num_branches, depth
        self.max_nodes = num_branches * depth

    def begin(self, model, prompt_ids, gen, stats) -> None:
        self.module = NgramModule(self.min_order, self.max_order)
        self.module.update(list(prompt_ids))

    def propose(self, context: list[int], max_nodes: int) -> Draft:
        return ngram_tree(self.module, context, self.num_branches, self.depth).truncate(max_nodes)

    def observe(self, context, verdict, logits) -> None:
        self.module.update(context)

    def memory_bytes(self) -> int:
        # rough: a key tuple + its dict of [count, pos] entries, ~100 bytes per stored item
        return sum(100 + 100 * len(v) for v in self.module.table.values())


@dataclass(frozen=True)
class NgramConfig:
    max_order: int = option(4, "longest n-gram context (tokens) in the multi-level module")
    min_order: int = option(1, "shortest n-gram context used when longer ones do not match")
    num_branches: int = option(2, "candidate next tokens, each starting a branch of the draft tree")
    depth: int = option(6, "tokens per branch (draft depth)")
    backoff: bool = option(True, "fall back to plain steps while drafts are rejected or cost more per "
                                 "token than plain decoding")
    size_drafts: bool = option(True, "pick each call's draft budget for the most tokens per second expected from recent calls (with backoff)")

    def validate(self) -> None:
        check(self.min_order >= 1, "min_order", f"must be at least 1, got {self.min_order}", "use min_order=1")
        check(self.max_order >= self.min_order, "max_order",
              f"must be ≥ min_order ({self.min_order}), got {self.max_order}", "e.g. max_order=4")
        check(self.max_order <= 16, "max_order", f"must be ≤ 16, got {self.max_order}", "e.g. max_order=4")
        check_range(self.num_branches, 1, 16, "num_branches", 2)
        check_range(self.depth, 1, 32, "depth", 6)


@register
class AdaptiveNgram(Method):
    name = "ngram"
    Config = NgramConfig
    summary = "ANPD: multi-level n-gram tables built online draft a tree of continuations (lossless)"
    family = "draft-and-verify"

    def decode(self, model, prompt_ids, gen, sink):
        c = self.config
        drafter = NgramDrafter(c.min_order, c.max_order, c.num_branches, c.depth)
        speculative_decode(model, drafter, prompt_ids, gen, sink, backoff=c.backoff, sizing=c.size_drafts)
