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
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field

import torch

from ..methods.plain import prefill
from ..models.base import CausalLM
from ..sampling import GenerationConfig, next_token
from ..stats import DecodeStats
from .sink import TokenSink
from .tree import Draft, preorder_order, tree_attention_mask, tree_positions
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

    #: whether :meth:`observe` reads ``logits`` beyond each row's argmax (then greedy verification
    #: computes every logit; a drafter that does not sets False)
    reads_logits = True

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
SIZES = (3, 7, 11, 15, 23, 31, 47, 63)   # draft budgets the sizing weighs (1 + b rows: whole blocks of 4)


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
      ``PROBE_NODES``: a call of 1 + 3 tokens costs little more than a plain
      step: 1.2-1.4x with the compiled kernels on the Zen 4, session 18, and
      PyTorch's float32/bfloat16 products pad every call to 4 rows anyway).
      A probe that fails doubles the wait (up to ``max_wait``), and waits at
      least long enough that the time it lost is at most ``probe_overhead`` of
      the plain steps before the next probe
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
    step is a plain one, so the plain cost is known early. The drafted cost
    decides only once ``min_samples`` drafted calls measured it: until then
    acceptance does, so one unlucky first draft (a costly one rejected at its
    first token) does not send the rest of a short request to plain steps.

    Sizing (``sizing``, on by default): while drafting pays, the budget is the
    one of :data:`SIZES` (up to the cap) with the most tokens per second
    expected from the last ``window`` drafted calls, instead of always the cap.
    A call costs more the more tokens it carries (on this CPU a 16-token call
    ~2x a 1-token one), while most drafts are accepted only a few tokens deep.
    For a call verified with budget ``B``, what a budget ``b <= B`` would have
    given is known exactly: the nodes it keeps are the first ``b`` the drafter
    proposed, so its accepted length is the number of accepted nodes among
    them (the loop passes their proposal positions), and its cost is the
    measured time of a call of ``min(b, nodes proposed) + 1`` tokens (moving
    averages per block of 4 tokens, interpolated between the sizes seen).
    Every ``explore_every``-th drafted call uses the cap, so longer drafts keep
    being measured; probes are recorded too (they tell about their own small
    budget). Once it has an estimate, the cost-aware test above compares the
    best budget's expected seconds per token with plain steps, not the average
    of the budgets used: drafting that pays only when short is kept, short.
    Without proposal positions (``update(..., path=None)``) the cap is used, as
    before.
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
    min_samples: int = 3               # drafted calls the drafted cost must rest on before it decides
    probe_overhead: float = 0.04       # failed probes may cost at most this share of the plain steps between them
    probe_nodes: int | None = None     # nodes a probe may carry (None: max_nodes)
    sizing: bool = True
    window: int = 32                   # drafted calls the sizing learns from
    explore_every: int = 8             # every n-th drafted call uses the cap
    wait: int = field(init=False, default=0)
    plain_steps: int = field(init=False, default=0)
    _next_wait: int = field(init=False, default=0)
    _samples: int = field(init=False, default=0)     # drafted calls measured into draft_avg
    _spacing: int = field(init=False, default=0)     # plain steps set after the last failed draft
    # sizing: (budget, nodes proposed, proposal positions of the accepted nodes) of recent drafted calls,
    # and moving averages of a step's seconds per size (tokens in the call, in blocks of 4)
    _records: deque = field(init=False, default=None)
    _seconds: dict = field(init=False, default_factory=dict)
    _drafted: int = field(init=False, default=0)
    _estimate: tuple | None = field(init=False, default=None)    # _best(max_nodes), refreshed by update()

    def __post_init__(self) -> None:
        self._next_wait = self.first_wait
        self._records = deque(maxlen=self.window)

    def allow(self) -> int:
        """Nodes the next call may carry (0 = a plain step: skip drafting)."""
        if not self.enabled:
            return self.max_nodes
        if self.cost_aware and self.plain_cost is None:
            self.plain_steps += 1
            return 0                                                 # measure a plain step first
        if not self._struggling():
            if self._costs_known() or self.ema >= 2 * self.min_accept:
                return self._size(self.max_nodes)
            return self._size(max(1, self.max_nodes // 2))
        if self.wait > 0:
            self.wait -= 1
            self.plain_steps += 1
            return 0
        return self.max_nodes if self.probe_nodes is None else min(self.max_nodes, self.probe_nodes)   # probe

    def _size(self, cap: int) -> int:
        """The budget up to ``cap`` with the most tokens per second expected (see the class docstring)."""
        self._drafted += 1
        if not self.sizing or self._drafted % self.explore_every == 0:
            return cap
        best = self._estimate if cap == self.max_nodes else self._best(cap)
        return cap if best is None else best[0]

    def _best(self, cap: int) -> tuple[int, float] | None:
        """(budget, expected tokens per second) of the best budget up to ``cap``, from the recent calls that
        could show it; None before 4 such calls, or without the call costs it needs."""
        if len(self._records) < 4:
            return None
        best = None
        seconds: dict[int, float | None] = {}
        for b in sorted({x for x in SIZES if x < cap} | {cap}):
            tokens, total, seen = 0, 0.0, 0
            for budget, n, path in self._records:
                if budget < b:
                    continue
                key = min(b, n) + 1
                if key not in seconds:
                    seconds[key] = self._call_seconds(key)
                if seconds[key] is None:
                    break
                seen += 1
                tokens += 1 + bisect_left(path, b)        # path positions increase: nodes kept by b
                total += seconds[key]
            else:
                if seen >= 4 and total > 0:
                    rate = tokens / total
                    if best is None or rate > best[1] * 1.02:       # a larger budget must pay clearly
                        best = (b, rate)
        return best

    @staticmethod
    def _bucket(tokens: int) -> int:
        return tokens if tokens <= 1 else -(-tokens // 4) * 4

    def _call_seconds(self, tokens: int) -> float | None:
        """Expected seconds of a step whose call carries ``tokens`` tokens: the moving average of its block
        of 4, else interpolated between the nearest sizes measured (linear beyond the largest)."""
        key = self._bucket(tokens)
        if key in self._seconds:
            return self._seconds[key]
        known = sorted(self._seconds)
        below = [k for k in known if k < key]
        above = [k for k in known if k > key]
        if below and above:
            lo, hi = below[-1], above[0]
            return self._seconds[lo] + (self._seconds[hi] - self._seconds[lo]) * (key - lo) / (hi - lo)
        if len(below) >= 2:
            lo, hi = below[-2], below[-1]
            slope = max(0.0, (self._seconds[hi] - self._seconds[lo]) / (hi - lo))
            return self._seconds[hi] + slope * (key - hi)
        return None

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
        return self.plain_avg, self.draft_avg, self.ema, self._next_wait, self._spacing, self._samples

    def restore(self, learned: tuple | None) -> "BackOff":
        """Start from what an earlier request on the same model and drafter learned (see :meth:`snapshot`).

        A drafter whose drafts did not pay then waits before its first probe as
        long as it would have after its last failed draft (a costly drafter's
        probe amortised to ``probe_overhead``) instead of paying for the lesson
        again early in every request.
        """
        if learned is not None:
            self.plain_avg, self.draft_avg, self.ema, self._next_wait, self._spacing, self._samples = learned
            if self.enabled and self._struggling():
                self.wait = max(self._next_wait, self._spacing)
        return self

    def _costs_known(self) -> bool:
        return self.cost_aware and self.plain_cost is not None and self.draft_cost is not None \
            and self._samples >= self.min_samples

    def _struggling(self) -> bool:
        if self._costs_known():                  # time per token decides; acceptance is only a proxy for it
            # with sizing, what the best budget is expected to cost, rather than what the budgets used did
            cost = self.draft_cost if self._estimate is None else 1.0 / self._estimate[1]
            return cost > self.margin * self.plain_cost
        return self.ema < self.min_accept

    def update(self, proposed: int, accepted: int, seconds: float | None = None, *,
               budget: int | None = None, path: list[int] | None = None) -> None:
        """Learn from a call that carried ``proposed`` draft nodes, ``accepted`` of them kept.

        ``seconds``: wall time of the whole step (drafting, verification,
        bookkeeping); ``None`` leaves the cost estimates alone. ``budget`` and
        ``path`` (the accepted nodes' positions in the drafter's proposal, which
        a budget keeps a prefix of) feed the sizing.
        """
        if not self.enabled:
            return
        if seconds is not None:
            key = self._bucket(proposed + 1)
            old = self._seconds.get(key)
            self._seconds[key] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds
        if self.sizing and proposed and budget is not None and path is not None:
            self._records.append((budget, proposed, tuple(path)))
        if self.sizing and self.cost_aware:
            self._estimate = self._best(self.max_nodes)
        probing = self._struggling()
        if seconds is not None and self.cost_aware:
            step = (seconds, float(accepted + 1))
            if proposed == 0:
                self.plain_avg = _mix(self.plain_avg, step, self.alpha)
            else:
                self.draft_avg = _mix(self.draft_avg, step, self.alpha)
                self._samples += 1
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
        if seconds is None or not self._costs_known():
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
                       sink: TokenSink, backoff: BackOff | bool = True, sizing: bool = True) -> None:
    """Generate into ``sink`` with ``drafter`` proposing and the target verifying (batch 1). ``sizing``: see
    :class:`BackOff` (applies when ``backoff`` is a bool)."""
    stats = sink.stats
    if not isinstance(backoff, BackOff):
        backoff = BackOff(drafter.max_nodes, enabled=bool(backoff), probe_nodes=PROBE_NODES, sizing=sizing)
    capacity = min(model.max_context, len(prompt_ids) + gen.max_new_tokens + backoff.max_nodes + 1)
    generator = None if gen.greedy else gen.generator()
    stats.prompt_tokens = len(prompt_ids)

    cache, last_logits = prefill(model, prompt_ids, capacity, sink, greedy=gen.greedy)  # last_logits (V,)
    # greedy verification reads only each row's argmax; a drafter may read the logits themselves
    forward = model.forward_greedy if gen.greedy and not drafter.reads_logits else model.forward
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
    budgets: dict[int, int] = {}

    while not sink.done:
        start = cache.length                      # the root (context[-1]) goes to slot `start`
        room = cache.capacity - start - 1
        if room < 0:
            break
        t_step = time.perf_counter()
        budget = min(backoff.allow(), room)
        if budget:
            budgets[budget] = budgets.get(budget, 0) + 1
        with stats.timing("draft"):
            draft = Draft.empty()
            if budget > 0:
                head = Draft.chain(carry[:budget])        # re-verified first, with exact logits
                draft = head.then(drafter.propose(context + head.tokens, budget - len(head))) \
                    if budget > len(head) else head
                carried += len(head)
            draft = draft.truncate(budget, max_depth=sink.remaining - 1)
            proposal = preorder_order(draft.parents)      # position in the proposal of each verified node
            draft = draft.select(proposal)                # in pre-order: see verify()
        stats.draft_tokens += len(draft)

        with stats.timing("verify"):
            ids = torch.tensor([[context[-1]] + draft.tokens])                     # (1, n+1)
            pos = tree_positions(draft.parents, len(context) - 1)[None]          # (1, n+1)
            mask = None if draft.is_chain else tree_attention_mask(draft.parents)[None]  # (1, n+1, n+1)
            logits = forward(cache, ids, pos, mask)[0]                            # (n+1, V)
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
        backoff.update(len(draft), verdict.num_accepted, time.perf_counter() - t_step, budget=budget,
                       path=[proposal[i] for i in verdict.accepted_nodes])

    stats.extra["drafter_memory_bytes"] = drafter.memory_bytes()
    stats.extra["backoff_plain_steps"] = backoff.plain_steps
    if budgets:
        stats.extra["draft_budgets"] = dict(sorted(budgets.items()))     # budget -> drafted calls given it
    if carried:
        stats.extra["carried_tokens"] = carried
    if backoff.plain_cost is not None and backoff.draft_cost is not None:
        stats.extra["backoff_cost_ratio"] = round(backoff.draft_cost / backoff.plain_cost, 3)
