"""The one verifier: which draft tokens the target keeps, for chains and trees.

Vocabulary. One verification call gives the target's logits at the root (the
last committed token) and at every draft node. Walking down from the root,

* an **accepted** token is a draft node the target keeps;
* the **recovered** token is the target's own token at the first position
  where every candidate child was rejected;
* the **bonus** token is the target's token after an accepted leaf (the whole
  path was accepted, so the call yields one more token for free).

Every call therefore produces ``len(accepted) + 1`` tokens.

Greedy (``temperature == 0``): a child is accepted when its token equals the
target's argmax at its parent; the output is exactly plain greedy decoding.

Sampling: recursive rejection sampling over the children of each node
(speculative sampling, Leviathan et al. 2023 and Chen et al. 2023 for one
child; multi-candidate form of SpecInfer, Miao et al. 2024). With ``r`` the
target distribution at the node, the children are tried in order; child ``x``
drawn from ``q`` is accepted with probability ``min(1, r(x) / q(x))``,
otherwise ``r <- norm(max(0, r - q))`` and the next child is tried; when all
are rejected the recovered token is drawn from the final ``r``. Deterministic
drafts use a one-hot ``q``, which reduces to "accept ``x`` with probability
``r(x)``, else remove ``x`` from ``r`` and renormalise". The produced tokens
follow the target distribution exactly, provided each node's ``q`` row is the
distribution it was really drawn from (given its path and earlier siblings).

Unless the target says otherwise (``exact_tree``: the native engine's compiled
attention sums over exactly the visible slots, in cache order, so a node's
logits equal its path's as a chain bit for bit), only nodes in the draft's
:attr:`~paradecode.decoding.tree.Draft.chain_prefix` get logits that equal plain
decoding's bit for bit; a node elsewhere in a tree sees its ancestors at other
cache slots, so PyTorch's attention sums in another order (last-bit
differences, which a low-precision format can turn into a flipped near-tie).
So the walk never uses the logits of a node outside that prefix:
when it accepts such a node, the node's token (chosen from its parent's exact
logits) is the call's last token, and its key/value is not kept. Lay the
likeliest path out first (:meth:`Draft.preorder`) to keep this rare.

What that node's close-but-not-exact logits say is not thrown away: the greedy
walk below it (matching children, then the argmax after the last one) is the
verdict's :attr:`~Verdict.carry`, which the decode loop puts at the head of the
next call's draft. There it is a chain, so its tokens are verified again, with
exact logits, before anything is committed (deferred re-verification): a tree's
second branch costs one call more, not its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..sampling import GenerationConfig, argmax, target_probs
from .tree import Draft


@dataclass
class Verdict:
    """Outcome of one verification call."""

    accepted_nodes: list[int]          # draft node indices on the kept path, root's child first
    tokens: list[int]                  # accepted draft tokens + the recovered/bonus token
    probs: list[float] = field(default_factory=list)  # target probability of each produced token
    draft: Draft | None = None         # the draft that was verified
    carry: list[int] = field(default_factory=list)  # tentative tokens after a stop off the chain (not committed)

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes)


def verify(logits: torch.Tensor, draft: Draft, gen: GenerationConfig,
           generator: torch.Generator | None = None, *, exact_tree: bool = False) -> Verdict:
    """Verify ``draft`` against the target's ``logits`` (n+1, V): row 0 = root, row i+1 = node i.

    ``exact_tree``: the target gives every node the logits its path would get fed as a chain, bit for
    bit (``model.exact_tree_logits``: the native engine's compiled attention), so the walk may use
    every node's logits; otherwise only the :attr:`~Draft.chain_prefix`'s."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(draft.parents):
        children.setdefault(p, []).append(i)
    exact = len(draft) if exact_tree else draft.chain_prefix       # nodes with plain decoding's logits
    if gen.greedy:
        return _verify_greedy(argmax(logits).tolist(), draft, children, exact)

    probs = target_probs(logits, gen)                                 # (n+1, V)
    accepted: list[int] = []
    tokens: list[int] = []
    out_probs: list[float] = []
    node = -1
    while True:
        r = probs[node + 1]                                           # (V,) target at this node
        picked = None
        for c in children.get(node, []):
            x = draft.tokens[c]
            q = _draft_row(draft, c, r.shape[-1])                     # (V,)
            u = float(torch.rand((), generator=generator))
            if u * float(q[x]) < float(r[x]):                         # accept with min(1, r(x)/q(x))
                picked = c
                break
            r = residual(r, q)
        if picked is None:
            tok = int(torch.multinomial(r, 1, generator=generator))
            tokens.append(tok)
            out_probs.append(float(probs[node + 1, tok]))
            return Verdict(accepted, tokens, out_probs, draft)
        tokens.append(draft.tokens[picked])
        out_probs.append(float(probs[node + 1, draft.tokens[picked]]))
        if picked >= exact:                  # its own logits are not plain decoding's: stop at its token
            best = argmax(logits).tolist()
            return Verdict(accepted, tokens, out_probs, draft, carry=_greedy_walk(best, draft, children, picked))
        accepted.append(picked)
        node = picked


def _verify_greedy(best: list[int], draft: Draft, children: dict[int, list[int]], exact: int) -> Verdict:
    """The greedy walk: ``best[i]`` is the target's argmax at row i (the root, then each node).

    A greedy target's distribution is one-hot, so every produced token has probability 1.
    """
    accepted: list[int] = []
    tokens: list[int] = []
    node = -1
    while True:
        tok = best[node + 1]
        tokens.append(tok)
        picked = next((c for c in children.get(node, []) if draft.tokens[c] == tok), None)
        if picked is None:
            return Verdict(accepted, tokens, [1.0] * len(tokens), draft)
        if picked >= exact:                  # its own logits are not plain decoding's: stop at its token
            return Verdict(accepted, tokens, [1.0] * len(tokens), draft,
                           carry=_greedy_walk(best, draft, children, picked))
        accepted.append(picked)
        node = picked


def _greedy_walk(best: list[int], draft: Draft, children: dict[int, list[int]], node: int) -> list[int]:
    """The argmax tokens from ``node`` down: each matching child in turn, then the argmax after the last one."""
    walk: list[int] = []
    while True:
        tok = best[node + 1]
        walk.append(tok)
        node = next((c for c in children.get(node, []) if draft.tokens[c] == tok), None)
        if node is None:
            return walk


def residual(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, r - q)) (V,): what is left of ``r`` after rejecting a draw from ``q``.

    If nothing is left (``q`` covers ``r`` up to rounding, so rejection had
    probability ~0) ``r`` itself is returned.
    """
    left = (r - q).clamp_(min=0)                                      # (V,)
    total = float(left.sum())
    return left / total if total > 1e-12 else r


def _draft_row(draft: Draft, node: int, vocab: int) -> torch.Tensor:
    if draft.q is not None:
        return draft.q[node]
    q = torch.zeros(vocab)
    q[draft.tokens[node]] = 1.0
    return q
