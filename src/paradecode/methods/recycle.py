"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating Inference
of Large Language Models with Token Recycling").

Every verification call computes logits at many positions and then throws
most of them away. Token Recycling keeps, for every token ``t`` of the
vocabulary, the top-``k`` next tokens the target predicted the last time it
saw ``t``: an adjacency matrix (V, k) refreshed from *all* positions of every
call (root and every draft node). The draft is built by breadth-first
expansion of a fixed tree template below the last committed token (node
with rank r takes its parent token's r-th candidate) and verified with tree
attention. Training-free; the matrix is V * k int32 (1.5 MB for V=49152,
k=8). Deterministic drafts, so the shared verifier keeps it lossless.

Differences from the paper: the template is generated (the best ``tree_nodes``
paths under a fixed rank-acceptance prior) instead of the paper's hand-made
80-node tree, because on a CPU a call's cost grows quickly with its width;
and the matrix starts from the prompt's own bigrams instead of a previous
request's matrix ("hot start").
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ..decoding.speculative import Drafter, speculative_decode
from ..decoding.tree import Draft
from .base import Method, check_range, option, register


def tree_template(num_nodes: int, topk: int, max_depth: int) -> list[tuple[int, int]]:
    """A static draft tree as ``(parent template node, candidate rank)`` pairs (-1 = root).

    Nodes are the ``num_nodes`` root paths with the highest prior score,
    ``prod(0.6 / (rank + 1) ** 2)`` over the path (a rough share of drafts
    accepted at each rank), listed best first. A child scores below its
    parent, so the list is in topological order and every prefix of it is
    itself the best tree of that size.

    >>> tree_template(4, topk=3, max_depth=3)
    [(-1, 0), (0, 0), (1, 0), (-1, 1)]
    """
    def prior(rank: int) -> float:
        return 0.6 / (rank + 1) ** 2

    out: list[tuple[int, int]] = []
    heap = [(-prior(r), 1, r, -1, r) for r in range(topk)]        # (-score, depth, order, parent, rank)
    heapq.heapify(heap)
    counter = topk
    while heap and len(out) < num_nodes:
        neg, depth, _, parent, rank = heapq.heappop(heap)
        out.append((parent, rank))
        if depth < max_depth:
            me = len(out) - 1
            for r in range(topk):
                counter += 1
                heapq.heappush(heap, (neg * prior(r), depth + 1, counter, me, r))
    return out


def expand_template(successors: torch.Tensor, root: int, template: list[tuple[int, int]],
                    max_nodes: int) -> Draft:
    """Fill the template from the adjacency matrix ``successors`` (V, k) int32, -1 = unknown.

    A template node whose parent is missing or whose candidate is unknown is
    dropped with its subtree. At most ``max_nodes`` nodes are kept.
    """
    rows: dict[int, list[int]] = {}

    def row(tok: int) -> list[int]:
        if tok not in rows:
            rows[tok] = successors[tok].tolist()
        return rows[tok]

    tokens: list[int] = []
    parents: list[int] = []
    slot: dict[int, int] = {}                   # template node -> draft node
    for t, (parent, rank) in enumerate(template):
        if len(tokens) >= max_nodes:
            break
        if parent == -1:
            above, dparent = root, -1
        elif parent in slot:
            dparent = slot[parent]
            above = tokens[dparent]
        else:
            continue
        tok = row(above)[rank]
        if tok < 0:
            continue
        slot[t] = len(tokens)
        tokens.append(tok)
        parents.append(dparent)
    return Draft(tokens, parents)


class RecyclingDrafter(Drafter):
    def __init__(self, topk: int, tree_nodes: int, max_depth: int):
        self.topk = topk
        self.max_nodes = tree_nodes
        self.template = tree_template(tree_nodes, topk, max_depth)

    def begin(self, model, prompt_ids, gen, stats) -> None:
        V = model.vocab_size
        self.successors = torch.full((V, self.topk), -1, dtype=torch.int32)   # (V, k)
        # warm start from the prompt's bigrams, most recent successor first
        seen: dict[int, list[int]] = {}
        for a, b in zip(reversed(prompt_ids[:-1]), reversed(prompt_ids[1:])):
            cands = seen.setdefault(a, [])
            if b not in cands and len(cands) < self.topk:
                cands.append(b)
        for a, cands in seen.items():
            self.successors[a, :len(cands)] = torch.tensor(cands, dtype=torch.int32)

    def propose(self, context: list[int], max_nodes: int) -> Draft:
        return expand_template(self.successors, context[-1], self.template, max_nodes)

    def observe(self, context, verdict, logits) -> None:
        root = context[-len(verdict.tokens) - 1]
        fed = torch.tensor([root] + verdict.draft.tokens)                    # (n+1,)
        top = logits.topk(self.topk, dim=-1).indices.to(torch.int32)         # (n+1, k)
        self.successors[fed] = top

    def memory_bytes(self) -> int:
        return self.successors.numel() * self.successors.element_size()


@dataclass(frozen=True)
class RecycleConfig:
    topk: int = option(8, "candidate next tokens kept per vocabulary token (adjacency matrix width)")
    tree_nodes: int = option(15, "draft tree size: nodes verified per call")
    max_depth: int = option(6, "deepest level of the draft tree template")
    backoff: bool = option(True, "fall back to plain steps while drafts are rejected or cost more per "
                                 "token than plain decoding")
    size_drafts: bool = option(True, "pick each call's draft budget for the most tokens per second expected from recent calls (with backoff)")

    def validate(self) -> None:
        check_range(self.topk, 1, 32, "topk", 8)
        check_range(self.tree_nodes, 1, 128, "tree_nodes", 15)
        check_range(self.max_depth, 1, 32, "max_depth", 6)


@register
class TokenRecycling(Method):
    name = "recycle"
    Config = RecycleConfig
    summary = "Token Recycling: reuse every call's top-k predictions as a token-tree draft (lossless)"
    family = "draft-and-verify"

    def decode(self, model, prompt_ids, gen, sink):
        c = self.config
        drafter = RecyclingDrafter(c.topk, c.tree_nodes, c.max_depth)
        speculative_decode(model, drafter, prompt_ids, gen, sink, backoff=c.backoff, sizing=c.size_drafts)
