"""Jacobi decoding: refine a block of guessed future tokens in parallel (greedy, lossless).

Santilli et al. 2023, "Accelerating Transformer Inference for Translation via
Parallel Decoding". Greedy decoding is the fixed point of the system
``y_i = argmax p(· | context, y_1 .. y_{i-1})``; Jacobi iteration solves it for
a block of guesses at once. One model call feeds

    [t0, g_0, g_1, ..., g_{n-1}]       t0 = last committed token, g = guesses

with the ordinary causal mask, and the argmax at each position gives new
values ``y_0 .. y_n`` (``y_i`` is the new value for the position of ``g_i``).
``y_0`` is always the greedy token, and ``y_i`` is final as soon as every guess
before it was already right (``g_j == y_j`` for ``j < i``): the **converged
prefix** ``y_0 .. y_k`` is accepted, so every call yields at least one token
and the output is token-for-token plain greedy decoding. The other outputs
are the next iterate of the still-unconverged guesses.

Variants, all parameters of the one loop in :meth:`Jacobi.decode`:

* ``mode="jacobi"`` — a sliding block: after each call the unconverged
  iterates are topped up with fresh guesses to ``block_size`` again;
* ``mode="gs-jacobi"`` — the Gauss-Seidel-Jacobi hybrid of the paper: the
  output is cut into blocks of ``block_size`` positions, Jacobi iterations
  run inside the current block until it has converged (Gauss-Seidel across
  blocks), then the next block starts;
* ``init`` — how fresh guesses are made: the pad token, a copy of the most
  recent tokens, or an n-gram guess (what followed the latest earlier
  occurrence of the context's tail, prompt-lookup style);
* ``max_iters`` — after that many calls the unconverged guesses are thrown
  away and re-initialised (0: never).

Cache discipline: the call appends the keys/values of ``t0`` and all
guesses; only ``t0, g_0 .. g_{k-1}`` (now committed) stay — a rollback, since
the converged guesses form a prefix of the block — so the cache always holds
exactly the committed tokens except the last one.

Greedy only: a Jacobi fixed point is the argmax chain. For sampling use
``lookahead`` (which routes its candidates through the exact verifier) or
another draft-and-verify method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..decoding.ngram_pool import lookup_continuation
from ..errors import UserError
from ..sampling import argmax, next_token
from .base import Method, check, check_range, option, register
from .plain import prefill

Init = Literal["pad", "copy", "ngram"]


def initial_guesses(context: list[int], k: int, init: str, pad_id: int) -> list[int]:
    """``k`` fresh guesses for the positions after ``context``.

    >>> initial_guesses([7, 8, 9], 2, "pad", 0)
    [0, 0]
    >>> initial_guesses([7, 8, 9], 4, "copy", 0)          # the most recent tokens, cycled
    [7, 8, 9, 7]
    >>> initial_guesses([4, 5, 6, 9, 4, 5], 4, "ngram", 0)  # "4 5" was followed by "6 9 4", then copy
    [6, 9, 4, 5]
    """
    if k <= 0:
        return []
    if init == "pad":
        return [pad_id] * k
    out = lookup_continuation(context, k) if init == "ngram" else []
    recent = context[-max(1, min(len(context), k - len(out))):]
    while len(out) < k:
        out.extend(recent[:k - len(out)])
    return out


@dataclass(frozen=True)
class JacobiConfig:
    block_size: int = option(3, "guessed tokens refined per call (the Jacobi block)")
    mode: Literal["jacobi", "gs-jacobi"] = option(
        "jacobi", "jacobi: sliding block topped up every call; gs-jacobi: Gauss-Seidel over fixed blocks")
    init: Init = option("ngram", "fresh guesses: pad token, copy of recent tokens, or n-gram lookup")
    max_iters: int = option(0, "re-initialise unconverged guesses after this many calls (0: never)")

    def validate(self) -> None:
        check_range(self.block_size, 1, 256, "block_size", 4)
        check_range(self.max_iters, 0, 10_000, "max_iters", 0)


@register
class Jacobi(Method):
    name = "jacobi"
    family = "jacobi"
    Config = JacobiConfig
    summary = "Jacobi iteration over a block of guessed tokens; greedy only (Santilli et al. 2023)"

    def decode(self, model, prompt_ids, gen, sink):
        if not gen.greedy:
            raise UserError("jacobi decoding is greedy only (its fixed point is the argmax chain)",
                            "use temperature 0, or the lookahead method to sample with Jacobi-style drafts",
                            field="temperature")
        cfg: JacobiConfig = self.config
        m, stats, pad = cfg.block_size, sink.stats, model.info.pad_token_id
        capacity = min(model.max_context, len(prompt_ids) + gen.max_new_tokens + m + 1)
        stats.prompt_tokens = len(prompt_ids)
        cache, last_logits = prefill(model, prompt_ids, capacity, sink, greedy=gen.greedy)  # (V,)
        first = int(next_token(last_logits, gen, None))
        stats.record_call(1)
        sink.record("prefill", proposed=[], accepted=[first])
        context = list(prompt_ids) + [first]
        if sink.emit([first]):
            return
        guesses = initial_guesses(context, m, cfg.init, pad)
        iters = 0
        while not sink.done:
            start = cache.length                     # t0 = context[-1] goes to slot `start`
            n = min(len(guesses), sink.remaining - 1, cache.capacity - start - 1)
            if n < 0:
                break
            g = guesses[:n]
            with stats.timing("verify"):
                ids = torch.tensor([[context[-1]] + g])                       # (1, n+1)
                logits = model.forward(cache, ids)[0]                         # (n+1, V), causal
                y = argmax(logits).tolist()                                # n+1 new values
                k = 0
                while k < n and g[k] == y[k]:
                    k += 1
                cache.rollback(start + k + 1)        # keep t0 and the converged guesses g_0..g_{k-1}
            accepted = y[:k + 1]
            stats.model_calls += 1
            stats.draft_tokens += n
            stats.record_call(min(len(accepted), sink.remaining))
            if sink.trace is not None:
                top = logits.softmax(-1).max(-1).values                       # (n+1,)
                sink.record("jacobi", proposed=g, accepted=accepted, outputs=y, iteration=iters,
                            probs=[round(float(p), 4) for p in top])
            iters += 1
            context.extend(accepted)
            if sink.emit(accepted):
                break
            # the unconverged iterates: y_{k+1}.. (a fixed block stops at its last position)
            rest = y[k + 1:] if cfg.mode == "jacobi" else y[k + 1:n]
            if not rest or (cfg.max_iters and iters >= cfg.max_iters):
                rest, iters = [], 0                  # a new block
            if cfg.mode == "jacobi" or not rest:
                rest = rest + initial_guesses(context + rest, m - len(rest), cfg.init, pad)
            guesses = rest
        stats.extra["jacobi_block_size"] = m
