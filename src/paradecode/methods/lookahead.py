"""Lookahead decoding: Jacobi trajectories feed an n-gram pool, verified in the same call (lossless).

Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding". Every model call carries three parts after the cached
context::

    [t0 | lookahead branch: N-1 levels x W columns | verification branch: candidate n-grams]

* ``t0`` — the last committed token (its key/value is not cached yet);
* the **lookahead branch** — a 2-D window of the last ``N - 1`` Jacobi
  trajectory levels over ``W`` future positions. The token at level ``l``,
  column ``j`` sits ``l + j + 1`` positions after ``t0`` and sees ``t0``, the
  oldest level's tokens before its column (``(0, j')`` for ``j' < j``) and its
  own column's history at earlier levels (``(l', j)`` for ``l' < l``) — one
  consistent token sequence per column, so the argmax at the newest level's
  token ``(N-2, j)`` continues the n-gram ``(0, j), (1, j), .., (N-2, j)``;
  those N-grams go into the pool and the outputs become the newest level
  (the oldest is dropped);
* the **verification branch** — up to ``G`` n-grams from the pool whose first
  token is ``t0``, merged into a token tree (shared prefixes once); each node
  sees ``t0`` and its ancestors only (SpecInfer-style tree attention). On a
  model without exact tree logits (``model.exact_tree_logits``), when
  the last call stopped at a node off the tree's leading chain, the tokens it
  predicted from there (:attr:`~paradecode.decoding.verify.Verdict.carry`)
  come first as a chain and the n-grams hang below them.

The verification branch goes through the shared verifier
(:func:`paradecode.decoding.verify.verify`): greedy keeps the longest
candidate prefix the target agrees with (output identical to plain greedy
decoding), sampling uses recursive rejection sampling over the candidates
(exact target distribution; the candidates are a deterministic function of
the history, so their ``q`` is one-hot). The cache keeps ``t0`` and the
accepted path only (``cache.compact``); the lookahead branch's keys/values
are always dropped. The lookahead branch itself is always greedy (argmax): it
only produces guesses.

The first ``N - 2`` calls warm the window up (one level more each call; the
first level is tokens drawn from the prompt); the pool may also be seeded with
the prompt's own n-grams (``prompt_seed``), which pays off when the output
repeats the input (summaries, code edits).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..decoding.ngram_pool import NGramPool, ngrams_of
from ..decoding.tree import Draft, node_depths, tree_attention_mask
from ..decoding.verify import verify
from ..sampling import argmax, next_token
from .base import Method, check, check_range, option, register
from .plain import prefill


def lookahead_layout(levels: int, window: int, parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and position offsets of one lookahead-decoding call.

    The call's tokens are ordered ``[t0, (0,0) .. (0,W-1), (1,0) .. (levels-1,W-1), v_0 .. v_{n-1}]``:
    the last committed token, the lookahead window level by level, then the
    verification tree (``parents`` as in :class:`~paradecode.decoding.tree.Draft`).
    Returns ``mask`` (T, T) bool (True = may attend; every token also sees the
    whole cache) and ``offsets`` (T,) long, the position of each token after
    ``t0``. Lookahead token ``(l, j)`` sits at offset ``l + j + 1`` and sees
    ``t0``, ``(0, j')`` for ``j' < j`` and ``(l', j)`` for ``l' ≤ l``;
    verification node ``i`` sits at its depth and sees ``t0``, its ancestors
    and itself. (The decode loop feeds the same tokens with the tree moved in
    front of the window, permuting ``mask`` and ``offsets`` to match: see
    :meth:`Lookahead.decode`.)

    >>> mask, off = lookahead_layout(2, 2, [-1, 0])   # tokens: t0, (0,0), (0,1), (1,0), (1,1), v0, v1
    >>> off.tolist()
    [0, 1, 2, 2, 3, 1, 2]
    >>> mask.int().tolist()
    [[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0], [1, 1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1, 1]]
    """
    LW, n = levels * window, len(parents)
    T = 1 + LW + n
    mask = torch.zeros(T, T, dtype=torch.bool)                       # (T, T)
    offsets = torch.zeros(T, dtype=torch.long)                       # (T,)
    mask[:, 0] = True                                                # everyone sees t0
    for l in range(levels):
        for j in range(window):
            i = 1 + l * window + j
            offsets[i] = l + j + 1
            mask[i, 1:1 + j] = True                                  # oldest level, columns before j
            mask[i, [1 + lp * window + j for lp in range(l + 1)]] = True  # own column, levels 0..l
    mask[1 + LW:, 1 + LW:] = tree_attention_mask(parents)[1:, 1:]    # the tree among its nodes
    offsets[1 + LW:] = torch.tensor(node_depths(parents), dtype=torch.long)
    return mask, offsets


def candidate_tree(candidates: list[tuple[int, ...]]) -> Draft:
    """Merge candidate continuations of ``t0`` into one token tree (a trie; shared prefixes once).

    >>> d = candidate_tree([(5, 6, 7), (5, 6, 8), (9, 1, 2)])
    >>> d.tokens, d.parents
    ([5, 6, 7, 8, 9, 1, 2], [-1, 0, 1, 1, -1, 4, 5])
    """
    tokens: list[int] = []
    parents: list[int] = []
    children: dict[tuple[int, int], int] = {}            # (parent node, token) -> node
    for cand in candidates:
        node = -1
        for t in cand:
            if (node, t) not in children:
                children[(node, t)] = len(tokens)
                tokens.append(int(t))
                parents.append(node)
            node = children[(node, t)]
    # a trie built candidate by candidate is already topologically ordered
    return Draft(tokens, parents)


@dataclass(frozen=True)
class LookaheadConfig:
    # Defaults: what the rule MAT / (c(T)/c(1)) picked on the 2-core CPU (docs/jacobi-lookahead.md);
    # the paper's GPU setting is window=7, ngram=5, guesses=7.
    window: int = option(1, "W: future positions in the lookahead window")
    ngram: int = option(3, "N: n-gram size (the window keeps N-1 trajectory levels)")
    guesses: int = option(1, "G: most candidate n-grams verified per call")
    pool_size: int = option(4096, "most n-grams the pool keeps (least recently inserted evicted first)")
    prompt_seed: bool = option(True, "seed the pool with the prompt's n-grams")

    def validate(self) -> None:
        check_range(self.window, 1, 64, "window", 3)
        check_range(self.ngram, 2, 16, "ngram", 3)
        check_range(self.guesses, 0, 64, "guesses", 2)
        check_range(self.pool_size, 1, 1 << 22, "pool_size", 4096)


@register
class Lookahead(Method):
    name = "lookahead"
    family = "jacobi"
    Config = LookaheadConfig
    summary = "Jacobi lookahead window + n-gram pool verified in one call (Fu et al. 2024)"

    def decode(self, model, prompt_ids, gen, sink):
        cfg: LookaheadConfig = self.config
        W, N, G, stats = cfg.window, cfg.ngram, cfg.guesses, sink.stats
        capacity = min(model.max_context, len(prompt_ids) + gen.max_new_tokens + 1 + (N - 1) * (W + G))
        generator = None if gen.greedy else gen.generator()
        stats.prompt_tokens = len(prompt_ids)
        cache, last_logits = prefill(model, prompt_ids, capacity, sink, greedy=gen.greedy)  # (V,)
        first = int(next_token(last_logits, gen, generator))
        stats.record_call(1)
        sink.record("prefill", proposed=[], accepted=[first])
        context = list(prompt_ids) + [first]
        if sink.emit([first]):
            return

        pool = NGramPool(per_key=max(1, G), capacity=cfg.pool_size)
        if cfg.prompt_seed:
            pool.extend(ngrams_of(prompt_ids, N))
        rng = random.Random(0)                               # only shapes guesses, never the output
        levels: list[list[int]] = [rng.choices(prompt_ids, k=W)]            # oldest first
        carry: list[int] = []                                # tentative tokens from the last call
        carried = 0
        while not sink.done:
            start = cache.length                             # t0 = context[-1] goes to slot `start`
            with stats.timing("draft"):
                head = Draft.chain(carry[:max(0, sink.remaining - 1)])   # re-verified first (Verdict.carry)
                last = head.tokens[-1] if head.tokens else context[-1]
                cands = [c[:max(0, sink.remaining - 1 - len(head))] for c in pool.lookup(last, G)]
                draft = head.then(candidate_tree([c for c in cands if c])).truncate(cache.capacity - start - 1)
                carried += len(head)
                L = len(levels)
                if start + 1 + L * W + len(draft) > cache.capacity:    # near the context limit: no lookahead
                    L = 0
                draft = draft.preorder()
                mask, offsets = lookahead_layout(L, W, draft.parents)  # (T, T), (T,)
                ids = [context[-1]] + [t for lvl in levels[:L] for t in lvl] + draft.tokens
                # the call itself puts the tree right after t0 and the window after it: the tree's first
                # path then sits where plain decoding puts those tokens (exact logits, see verify())
                n = len(draft)
                order = [0] + list(range(1 + L * W, 1 + L * W + n)) + list(range(1, 1 + L * W))
                mask, offsets = mask[order][:, order], offsets[order]
                ids = [ids[i] for i in order]
            stats.draft_tokens += len(draft)
            with stats.timing("verify"):
                ver = list(range(1 + n))                             # slots of t0 and the tree
                newest = list(range(1 + n + (L - 1) * W, 1 + n + L * W)) if L else []  # the newest level
                # logits only where they are used: t0, the tree, the newest level (saves lm_head rows)
                logits = model.forward(cache, torch.tensor([ids]), (start + offsets)[None], mask[None],
                                       logits_for=torch.tensor(ver + newest))[0]  # (1 + n + W, V)
                verdict = verify(logits[:len(ver)], draft, gen, generator,
                                 exact_tree=model.exact_tree_logits)
                cache.compact(start, [0] + [ver[i + 1] for i in verdict.accepted_nodes])
                carry = verdict.carry
            stats.model_calls += 1
            stats.record_call(min(len(verdict.tokens), sink.remaining))
            with stats.timing("draft"):
                if L:
                    new = argmax(logits[len(ver):]).tolist()                  # next Jacobi level (W,)
                    if L == N - 1:
                        pool.extend(tuple(col) for col in zip(*levels, new))    # N-grams, one per column
                        levels = levels[1:]
                    levels.append(new)
            if sink.trace is not None:
                sink.record("lookahead", proposed=[list(c) for c in cands], accepted=verdict.tokens,
                            draft=draft.tokens, parents=draft.parents, levels=[list(v) for v in levels],
                            probs=[round(p, 4) for p in verdict.probs])
            context.extend(verdict.tokens)
            if sink.emit(verdict.tokens):
                break
        stats.extra["ngram_pool_size"] = len(pool)
        if carried:
            stats.extra["carried_tokens"] = carried
