"""Unmasking rules: pure functions over one step's confidences.

Vocabulary. At each step the model gives, for every answer slot, a
distribution; ``conf`` is the probability of its argmax token and ``gap`` the
log-probability margin between its top-1 and top-2 tokens. ``masked`` marks the
slots still hidden that this step may commit (the current block). Every rule
returns a boolean ``commit`` mask (B, G) that is a subset of ``masked`` and,
in every row that still has a masked slot, commits at least one (the most
confident) — so every step makes progress and decoding terminates.

Ties are broken by position (stable sort), identically in every rule, so the
one-token-per-step order is well defined (FreeDave relies on it).
"""

from __future__ import annotations

import torch

NEG = float("-inf")


def step_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, conf, gap), each (B, G), from logits (B, G, V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)                      # (B, G, V)
    top = logp.topk(2, dim=-1)
    tokens = top.indices[..., 0]
    return tokens, top.values[..., 0].exp(), top.values[..., 0] - top.values[..., 1]


def rank_masked(conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Slot indices (B, G) by decreasing confidence, masked slots first, ties by position."""
    return torch.sort(conf.masked_fill(~masked, NEG), dim=-1, descending=True, stable=True).indices


def top_k(conf: torch.Tensor, masked: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Commit the ``k`` (per row, (B,) or int) most confident masked slots — LLaDA's low-confidence
    remasking (Nie et al., 2025, Alg. 5): the unmasked slots with the lowest confidence stay masked."""
    B, G = conf.shape
    k = torch.as_tensor(k).expand(B).clamp(min=1)
    order = rank_masked(conf, masked)                                    # (B, G)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(G).expand(B, G))
    return masked & (rank < k[:, None])


def at_least_one(commit: torch.Tensor, conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``commit`` restricted to ``masked``, plus the most confident masked slot of every row."""
    return (commit & masked) | top_k(conf, masked, 1)


def threshold_rule(conf: torch.Tensor, masked: torch.Tensor, tau: float) -> torch.Tensor:
    """Fast-dLLM threshold rule (Wu et al., 2025, §3.3): commit every masked slot with confidence
    strictly above ``tau``, and always the most confident one. ``tau = 1`` is one token per step."""
    return at_least_one(conf > tau, conf, masked)


def factor_rule(conf: torch.Tensor, masked: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM factor rule: sort confidences c1 >= c2 >= ...; commit the n-th (1-based) while
    c_n >= 1 - f / (n + 1), i.e. the largest n with (n + 1)(1 - c_n) <= f, and at least one.

    Example: f = 1, confidences (0.99, 0.8, 0.7): n=1 needs 0.5 ✓, n=2 needs 2/3 ✓,
    n=3 needs 0.75 ✗ → commit two.
    """
    B, G = conf.shape
    order = rank_masked(conf, masked)                                    # (B, G)
    c = conf.gather(1, order).masked_fill(~masked.gather(1, order), NEG)  # (B, G) sorted desc
    n = torch.arange(1, G + 1, dtype=conf.dtype)
    ok = (c >= 1 - factor / (n + 1)).long().cumprod(dim=1)               # prefix that passes
    k = ok.sum(dim=1)                                                    # (B,)
    return top_k(conf, masked, k)


def local_leap_rule(conf: torch.Tensor, masked: torch.Tensor, anchor_tau: float, relaxed_tau: float,
                    radius: int) -> torch.Tensor:
    """LocalLeap (Kong et al., 2025): slots above ``anchor_tau`` are anchors and commit; masked
    slots within ``radius`` positions of an anchor commit at the relaxed threshold ``relaxed_tau``.
    Always at least the most confident slot."""
    anchors = masked & (conf > anchor_tau)                               # (B, G)
    near = torch.nn.functional.max_pool1d(anchors.float()[:, None], 2 * radius + 1, stride=1,
                                          padding=radius)[:, 0] > 0      # (B, G) within radius
    return at_least_one(anchors | (near & (conf > relaxed_tau)), conf, masked)


def prophet_go_all_in(gap: torch.Tensor, masked: torch.Tensor, progress: torch.Tensor,
                      thresholds: tuple[float, float, float]) -> torch.Tensor:
    """Prophet early-commit test (Li et al., 2025, "Diffusion language models know the answer
    before decoding"): (B,) True when the mean top-1/top-2 log-probability gap over the still
    masked answer slots reaches a threshold that relaxes as decoding progresses — high in the
    first third of the answer, medium in the second, low in the last. ``progress`` (B,) is the
    fraction of answer slots already committed."""
    hi, mid, lo = thresholds
    tau = torch.where(progress < 1 / 3, hi, torch.where(progress < 2 / 3, mid, lo))
    n = masked.sum(dim=1).clamp(min=1)
    mean_gap = (gap * masked).sum(dim=1) / n                             # (B,)
    return masked.any(dim=1) & (mean_gap >= tau)


def eot_fill(tokens: torch.Tensor, committed: torch.Tensor, eos_id: int) -> torch.Tensor:
    """End-of-text prediction (Learn2PD, Bao et al., 2025): once ``<eos>`` is committed at some
    slot, every slot after the first committed ``<eos>`` is ``<eos>`` too. Returns (B, G) bool:
    the slots to fill with ``<eos>``. Worked example: committed eos at slot 3 of 6 → slots 4, 5."""
    is_eos = (committed & (tokens == eos_id)).long()                     # (B, G)
    return (is_eos.cumsum(dim=1) - is_eos) > 0                           # an eos strictly before


def llada_schedule(n_masked: int, steps: int) -> list[int]:
    """Tokens to commit at each of ``steps`` steps for a block of ``n_masked`` slots
    (LLaDA's ``get_num_transfer_tokens``: as even as possible, remainder first)."""
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]
