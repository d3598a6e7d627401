"""The shared draft-and-verify loop: every drafter feeds this one loop and one verifier.

Each step (gpt-fast's ``speculative_decode``, generalised to trees):

1. the drafter proposes a :class:`~.tree.Draft` (a chain or a tree; empty =
   a plain step) within a node budget set by :class:`BackOff`, the remaining
   token budget and the cache capacity;
2. ONE target call feeds ``[last committed token, node_0 .. node_{n-1}]``
   with the tree attention mask and tree positions, giving logits for the
   root and every node (the last committed token's key/value is not cached
   yet, so every call computes it);
3. :func:`~.verify.verify` picks the accepted path plus the recovered/bonus
   token. With ``model.exact_tree_logits`` (the native engine's compiled
   attention) it may walk down any branch; otherwise, when it stopped at a
   tree node off the draft's leading chain, it also returns a *carry*: what
   that node's close-but-not-exact logits predict next; the next draft starts
   with it as a chain, so it is verified again exactly;
4. ``cache.compact`` keeps the root and the accepted path in place, dropping
   every other node's key/value;
5. the tokens go to the sink (which alone applies EOS, stop strings and the
   token budget) and the drafter observes the call.

Lossless: greedy output equals plain greedy decoding and sampled output
follows the target distribution exactly, whatever the drafter proposes.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..methods.plain import prefill
from ..models.base import CausalLM
from ..sampling import GenerationConfig, next_token
from ..stats import DecodeStats
from .sink import TokenSink
from .tree import Draft, tree_attention_mask, tree_positions
from .verify import Verdict, verify


class Drafter(ABC):
    """Proposes drafts and learns from verification. One instance per request.

    ``max_nodes`` is the largest draft the drafter wants verified in one call;
    the loop may ask for fewer (back-off, end of budget, cache capacity).
    """

    max_nodes: int = 8

    def begin(self, model: CausalLM, prompt_ids: list[int], gen: GenerationConfig, stats: DecodeStats) -> None:
        """Reset state for a new request (build tables from the prompt...)."""

    def share_cache(self, cache) -> None:
        """The target's KV cache, holding the prompt, given before :meth:`begin`.

        A drafter that is a cheaper version of the target may draft on it (its
        keys/values of the committed tokens are the target's own) provided it
        rolls the cache back to where it found it before :meth:`propose`
        returns: the verification call writes from there.
        """

    @abstractmethod
    def propose(self, context: list[int], max_nodes: int) -> Draft:
        """A draft of at most ``max_nodes`` nodes continuing ``context``.

        ``context`` is prompt + committed tokens, possibly followed by tokens the loop
        carries from the last call (:attr:`Verdict.carry`) that are not committed yet:
        learn from committed tokens in :meth:`observe`, not here.
        """

    def observe(self, context: list[int], verdict: Verdict, logits: torch.Tensor) -> None:
        """Learn from one verification call.

        ``context`` is prompt + committed tokens *including* ``verdict.tokens``;
        ``logits`` (n+1, V) are the target's logits at the root
        (``context[-len(verdict.tokens) - 1]``) and at each node of
        ``verdict.draft``.
        """

    def memory_bytes(self) -> int:
        """Extra memory the drafter holds (reported in ``stats.extra``)."""
        return 0


PROBE_NODES = 3     # nodes a back-off probe carries in the decode loop (see BackOff)


@dataclass
class BackOff:
    """Adaptive draft budget, so a drafter whose drafts keep failing costs ~nothing.

    A call that carries a draft costs more than a plain step (on the 2-core
    CPU a 2..16-token call takes ~1.6x a 1-token call; on a GPU the ratio is
    smaller but above 1), so drafting pays only while drafts are accepted.
    The policy keeps an exponential moving average ``ema`` (weight ``alpha``)
    of the tokens accepted per drafted call:

    * ``ema >= 2 * min_accept``: the full budget, ``max_nodes``;
    * ``min_accept <= ema < 2 * min_accept``: half of it (shrink);
    * ``ema < min_accept``: ``wait`` plain steps with an empty draft, then one
      probe of at most ``probe_nodes`` nodes (the decode loop uses
      ``PROBE_NODES``: a call of 1 + 3 tokens fills the 4 rows that the native
      engine's float32/bfloat16 products pad every call to, so it costs about a
      plain step). A probe that fails doubles the wait (up to
      ``max_wait``), and waits at least long enough that the time it lost is
      at most ``probe_overhead`` of the plain steps before the next probe
      (costly drafters probe rarely); one that succeeds lifts ``ema`` and drafting resumes
      (regrow), with the wait reset to ``first_wait``.

    Calls whose draft was empty (the drafter had nothing to propose) teach
    acceptance nothing. ``enabled=False`` keeps the budget fixed at ``max_nodes``.

    Cost awareness (``cost_aware``, on by default): accepted tokens alone do
    not decide whether drafting pays — a draft model or a skipped-layer draft
    costs real time per drafted token. The policy also keeps moving averages
    of the wall time per produced token of drafted steps and of plain steps
    (drafting, verification and the drafter's bookkeeping included), measured
    as the decode runs; while drafted steps cost more per token than plain
    steps, it behaves as if acceptance were too low (plain steps, then probes).
    Once both costs are known they alone decide (acceptance is only a proxy
    for them: a cheap draft pays even when half of it is rejected); drafting
    must save at least ``1 - margin`` of the plain cost per token, so a
    drafter at break-even, which only adds timing noise, steps aside. The first
    step is a plain one, so the plain cost is known early.
    """

    max_nodes: int
    enabled: bool = True
    min_accept: float = 0.5
    alpha: float = 0.3
    first_wait: int = 4
    max_wait: int = 64
    ema: float = 1.5                   # optimistic start: every drafter gets a fair trial
    cost_aware: bool = True
    # moving averages of (seconds, tokens) per step, for plain and for drafted steps
    plain_avg: tuple[float, float] | None = None
    draft_avg: tuple[float, float] | None = None
    margin: float = 0.9                # draft only while it costs at most this share of plain per token
    probe_overhead: float = 0.04       # failed probes may cost at most this share of the plain steps between them
    probe_nodes: int | None = None     # nodes a probe may carry (None: max_nodes)
    wait: int = field(init=False, default=0)
    plain_steps: int = field(init=False, default=0)
    _next_wait: int = field(init=False, default=0)
    _spacing: int = field(init=False, default=0)     # plain steps set after the last failed draft

    def __post_init__(self) -> None:
        self._next_wait = self.first_wait

    def allow(self) -> int:
        """Nodes the next call may carry (0 = a plain step: skip drafting)."""
        if not self.enabled:
            return self.max_nodes
        if self.cost_aware and self.plain_cost is None:
            self.plain_steps += 1
            return 0                                                 # measure a plain step first
        if not self._struggling():
            if self._costs_known() or self.ema >= 2 * self.min_accept:
                return self.max_nodes
            return max(1, self.max_nodes // 2)
        if self.wait > 0:
            self.wait -= 1
            self.plain_steps += 1
            return 0
        return self.max_nodes if self.probe_nodes is None else min(self.max_nodes, self.probe_nodes)   # probe

    @property
    def plain_cost(self) -> float | None:
        """Seconds per token of plain steps (ratio of the moving averages)."""
        return None if self.plain_avg is None else self.plain_avg[0] / self.plain_avg[1]

    @property
    def draft_cost(self) -> float | None:
        """Seconds per token of drafted steps: one failed draft weighs its one token, not a whole step's."""
        return None if self.draft_avg is None else self.draft_avg[0] / self.draft_avg[1]

    def snapshot(self) -> tuple:
        """What this policy learned (costs, acceptance, probe spacing), to start a later request from."""
        return self.plain_avg, self.draft_avg, self.ema, self._next_wait, self._spacing

    def restore(self, learned: tuple | None) -> "BackOff":
        """Start from what an earlier request on the same model and drafter learned (see :meth:`snapshot`).

        A drafter whose drafts did not pay then waits before its first probe as
        long as it would have after its last failed draft (a costly drafter's
        probe amortised to ``probe_overhead``) instead of paying for the lesson
        again early in every request.
        """
        if learned is not None:
            self.plain_avg, self.draft_avg, self.ema, self._next_wait, self._spacing = learned
            if self.enabled and self._struggling():
                self.wait = max(self._next_wait, self._spacing)
        return self

    def _costs_known(self) -> bool:
        return self.cost_aware and self.plain_cost is not None and self.draft_cost is not None

    def _struggling(self) -> bool:
        if self._costs_known():                  # time per token decides; acceptance is only a proxy for it
            return self.draft_cost > self.margin * self.plain_cost
        return self.ema < self.min_accept

    def update(self, proposed: int, accepted: int, seconds: float | None = None) -> None:
        """Learn from a call that carried ``proposed`` draft nodes, ``accepted`` of them kept.

        ``seconds``: wall time of the whole step (drafting, verification,
        bookkeeping); ``None`` leaves the cost estimates alone.
        """
        if not self.enabled:
            return
        probing = self._struggling()
        if seconds is not None and self.cost_aware:
            step = (seconds, float(accepted + 1))
            if proposed == 0:
                self.plain_avg = _mix(self.plain_avg, step, self.alpha)
            else:
                self.draft_avg = _mix(self.draft_avg, step, self.alpha)
        if proposed == 0:
            return
        self.ema = (1 - self.alpha) * self.ema + self.alpha * accepted
        if not self._struggling():
            self._next_wait = self.first_wait
            return
        if probing:                                                  # a failed probe
            self._next_wait = min(self.max_wait, self._next_wait * 2)
        self.wait = self._spacing = max(self._next_wait, self._wait_to_amortise(seconds, accepted))

    def _wait_to_amortise(self, seconds: float | None, accepted: int) -> int:
        """Plain steps needed so that this failed step's extra time is at most ``probe_overhead`` of them.

        A failed probe of a free drafter (prompt lookup) loses a fraction of a
        step; one of a costly drafter (a skipped-layer draft) loses several,
        so it waits proportionally longer before probing again (up to ``max_wait``).
        """
        if seconds is None or not self.cost_aware or self.plain_cost is None:
            return 0
        lost = seconds - self.plain_cost * (accepted + 1)               # versus plain steps for those tokens
        if lost <= 0:
            return 0
        return min(self.max_wait, math.ceil(lost / (self.probe_overhead * self.plain_cost)))


def _mix(old: tuple[float, float] | None, new: tuple[float, float], alpha: float) -> tuple[float, float]:
    if old is None:
        return new
    return ((1 - alpha) * old[0] + alpha * new[0], (1 - alpha) * old[1] + alpha * new[1])


def speculative_decode(model: CausalLM, drafter: Drafter, prompt_ids: list[int], gen: GenerationConfig,
                       sink: TokenSink, backoff: BackOff | bool = True) -> None:
    """Generate into ``sink`` with ``drafter`` proposing and the target verifying (batch 1)."""
    stats = sink.stats
    if not isinstance(backoff, BackOff):
        backoff = BackOff(drafter.max_nodes, enabled=bool(backoff), probe_nodes=PROBE_NODES)
    capacity = min(model.max_context, len(prompt_ids) + gen.max_new_tokens + backoff.max_nodes + 1)
    generator = None if gen.greedy else gen.generator()
    stats.prompt_tokens = len(prompt_ids)

    cache, last_logits = prefill(model, prompt_ids, capacity, sink)  # last_logits (V,)
    first = int(next_token(last_logits, gen, generator))
    stats.record_call(1)
    with stats.timing("draft"):
        drafter.share_cache(cache)
        drafter.begin(model, prompt_ids, gen, stats)
    context = list(prompt_ids) + [first]
    sink.emit([first])
    carry: list[int] = []                         # tentative tokens from the last call (Verdict.carry)
    carried = 0
    exact_tree = model.exact_tree_logits   # every node's logits usable (verify())

    while not sink.done:
        start = cache.length                      # the root (context[-1]) goes to slot `start`
        room = cache.capacity - start - 1
        if room < 0:
            break
        t_step = time.perf_counter()
        budget = min(backoff.allow(), room)
        with stats.timing("draft"):
            draft = Draft.empty()
            if budget > 0:
                head = Draft.chain(carry[:budget])        # re-verified first, with exact logits
                draft = head.then(drafter.propose(context + head.tokens, budget - len(head))) \
                    if budget > len(head) else head
                carried += len(head)
            draft = draft.truncate(budget, max_depth=sink.remaining - 1).preorder()   # see verify()
        stats.draft_tokens += len(draft)

        with stats.timing("verify"):
            ids = torch.tensor([[context[-1]] + draft.tokens])                     # (1, n+1)
            pos = tree_positions(draft.parents, len(context) - 1)[None]          # (1, n+1)
            mask = None if draft.is_chain else tree_attention_mask(draft.parents)[None]  # (1, n+1, n+1)
            logits = model.forward(cache, ids, pos, mask)[0]                      # (n+1, V)
            verdict = verify(logits, draft, gen, generator, exact_tree=exact_tree)
            cache.compact(start, [0] + [i + 1 for i in verdict.accepted_nodes])
        carry = verdict.carry
        stats.model_calls += 1
        stats.record_call(min(len(verdict.tokens), sink.remaining))
        sink.record("verify", proposed=draft.tokens, accepted=verdict.tokens, parents=draft.parents,
                    probs=[round(p, 4) for p in verdict.probs])
        context.extend(verdict.tokens)
        if sink.emit(verdict.tokens):
            break
        with stats.timing("draft"):
            drafter.observe(context, verdict, logits)
        backoff.update(len(draft), verdict.num_accepted, time.perf_counter() - t_step)

    stats.extra["drafter_memory_bytes"] = drafter.memory_bytes()
    stats.extra["backoff_plain_steps"] = backoff.plain_steps
    if carried:
        stats.extra["carried_tokens"] = carried
    if backoff.plain_cost is not None and backoff.draft_cost is not None:
        stats.extra["backoff_cost_ratio"] = round(backoff.draft_cost / backoff.plain_cost, 3)
