"""Choosing which layers a self-speculative draft skips, by a short calibration on the prompt.

Draft & Verify (Zhang et al. 2023, "Draft & Verify: Lossless Large Language
Model Acceleration via Self-Speculative Decoding") drafts with the target
itself, skipping some intermediate layers, and picks the skip set offline by
Bayesian optimisation; SWIFT (Xia et al. 2024) searches it on the fly. Here
the search is a small, deterministic hill climb on the first prompt a model
serves (then kept for that model), within a budget of ``steps`` short forward
passes:

1. the draft drafts on the target's own cache (like Draft & Verify's draft),
   which holds the prompt encoded with every layer; the full model's argmax
   at the prompt's last ``CALIBRATION_WINDOW`` positions is the reference;
2. a skip set scores ``(agreement, soft)``: those positions are fed again with
   only the kept layers, teacher-forced, exactly as the draft will run; the
   score is the share of positions where the skipped model's argmax equals
   the reference, then — to break ties — the mean probability it gives the
   reference token;
3. a few structured seeds are scored first (evenly spaced, a late block, a
   middle block), then the best set so far is mutated by swapping one skipped
   layer with one kept layer, keeping the swap when the score does not drop.

The first and last layers are never skipped (they map to and from the
embedding space). Everything here only shapes the draft: the output stays
exactly the target's, whatever set is chosen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch

Score = tuple[float, float]      # (argmax agreement, mean probability of the reference token)
CALIBRATION_WINDOW = 32          # prompt positions a skip set is scored on


def skippable(num_layers: int) -> list[int]:
    """Layers a draft may skip: all but the first and the last."""
    return list(range(1, num_layers - 1))


def skip_count(num_layers: int, ratio: float) -> int:
    """How many layers ``ratio`` of the model means, within the skippable ones."""
    return max(0, min(len(skippable(num_layers)), round(ratio * num_layers)))


def seed_sets(num_layers: int, n_skip: int) -> list[tuple[int, ...]]:
    """Structured starting points for the search (distinct, each of size ``n_skip``).

    >>> seed_sets(10, 3)
    [(1, 5, 8), (5, 6, 7), (3, 4, 5)]
    """
    cand = skippable(num_layers)
    if n_skip == 0:
        return [()]
    m = len(cand)
    even = tuple(cand[round(i * (m - 1) / max(1, n_skip - 1))] for i in range(n_skip)) if n_skip > 1 \
        else (cand[m // 2],)
    late = tuple(cand[m - 1 - n_skip: m - 1]) if n_skip < m else tuple(cand)
    mid0 = (m - n_skip) // 2
    middle = tuple(cand[mid0: mid0 + n_skip])
    out: list[tuple[int, ...]] = []
    for s in (even, late, middle):
        s = tuple(sorted(set(s)))
        if len(s) == n_skip and s not in out:
            out.append(s)
    return out


@dataclass
class SkipSearch:
    """Result of the search: the chosen set, its score and every set evaluated (in order)."""

    skip: tuple[int, ...]
    score: Score
    evaluated: list[tuple[tuple[int, ...], Score]] = field(default_factory=list)


def search_skip_set(score: Callable[[tuple[int, ...]], Score], num_layers: int, n_skip: int, steps: int,
                    seed: int = 0) -> SkipSearch:
    """Hill-climb over skip sets of size ``n_skip`` with at most ``steps`` calls of ``score``.

    Pure apart from ``score``: deterministic for a given ``seed``. With
    ``steps == 0`` (no calibration) returns the evenly spaced seed unscored.
    """
    seeds = seed_sets(num_layers, n_skip)
    if steps <= 0 or n_skip == 0:
        return SkipSearch(seeds[0], (float("nan"), float("nan")))
    rng = random.Random(seed)
    seen: dict[tuple[int, ...], Score] = {}

    def evaluate(s: tuple[int, ...]) -> Score:
        seen[s] = score(s)
        return seen[s]

    for s in seeds[:steps]:
        evaluate(s)
    best = max(seen, key=seen.__getitem__)
    cand = skippable(num_layers)
    for _ in range(steps - len(seen)):
        kept = [c for c in cand if c not in best]
        if not kept:
            break
        trial = None
        for _attempt in range(20):      # find a swap not evaluated yet
            out_l, in_l = rng.choice(best), rng.choice(kept)
            t = tuple(sorted((set(best) - {out_l}) | {in_l}))
            if t not in seen:
                trial = t
                break
        if trial is None:
            break
        if evaluate(trial) >= seen[best]:
            best = trial
    return SkipSearch(best, seen[best], list(seen.items()))


def agreement(reference: torch.Tensor, logits: torch.Tensor) -> Score:
    """Score draft logits (T, V) against the reference argmax tokens (T,).

    >>> ref = torch.tensor([0, 1])
    >>> agreement(ref, torch.tensor([[2.0, 0.0], [2.0, 0.0]]))[0]
    0.5
    """
    probs = logits.float().softmax(-1)                                   # (T, V)
    agree = (logits.argmax(-1) == reference).float().mean()
    soft = probs.gather(-1, reference[:, None]).mean()
    return float(agree), float(soft)


def calibrate(model, cache, prompt_ids: list[int], n_skip: int, steps: int,
              window: int = CALIBRATION_WINDOW) -> SkipSearch:
    """Choose ``n_skip`` layers to skip, on ``cache`` which already holds the prompt (every layer).

    The reference is the full model's argmax at the prompt's last ``window``
    positions (each predicts the next prompt token). A skip set is scored
    teacher-forced on those positions, fed with the kept layers on top of the
    full-model prefix, just as the draft will run; afterwards those positions
    are re-encoded with every layer, so the cache ends as it began. Cost: two
    full passes of ``window + 1`` tokens plus ``steps`` passes of ``window``
    tokens with the kept layers.
    """
    L = model.info.num_layers
    P = len(prompt_ids)
    W = min(window, P - 1)
    if steps <= 0 or n_skip == 0 or W < 1:
        return search_skip_set(lambda s: (0.0, 0.0), L, n_skip, 0)
    if cache.length != P:
        raise ValueError(f"calibrate needs the cache to hold the prompt ({P} tokens), it holds {cache.length}")
    start = P - 1 - W
    tail = torch.tensor([prompt_ids[start:]])                               # (1, W+1)

    def reencode(logits_for: torch.Tensor) -> torch.Tensor:
        cache.rollback(start)
        with torch.inference_mode():
            return model.forward(cache, tail, logits_for=logits_for)[0]    # every layer

    reference = reencode(torch.arange(W)).argmax(-1)                        # (W,)

    def score(skip: tuple[int, ...]) -> Score:
        kept = [i for i in range(L) if i not in skip]
        cache.rollback(start)
        with torch.inference_mode():
            logits = model.forward(cache, tail[:, :W], layers=kept)[0]      # (W, V)
        return agreement(reference, logits)

    search = search_skip_set(score, L, n_skip, steps)
    reencode(torch.tensor([W]))                                             # back to full-model keys/values
    return search
