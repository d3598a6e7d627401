"""Drafting a chain with an autoregressive draft LM that keeps its own KV cache.

Shared by the ``draft`` method (a smaller model with the same tokenizer;
Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling") and the ``selfspec`` method (the target with layers
skipped; Zhang et al. 2023, "Draft & Verify").

Cache bookkeeping. The draft cache mirrors a token list ``cached``: slot ``i``
holds the draft's keys/values of ``cached[i]``. Before drafting, the cache is
rolled back to the longest common prefix of ``cached`` and the current
context, and the missing context tokens (usually the recovered/bonus token,
plus the last draft token when the whole draft was accepted) are fed in one
call whose last logits give the first draft token. Rejected draft tokens are
thus forgotten and accepted ones kept without recomputation.

Draft length. Two training-free rules, both from transformers' assisted
generation: the ``heuristic`` schedule grows k by 2 when every drafted token
was accepted and shrinks it by 1 otherwise; and drafting stops early once the
draft's own probability of the token it just proposed (softmax at temperature
1) falls below ``confidence_threshold`` (the token is kept: it may still be
accepted, and verifying it costs almost nothing).

Exactness. When sampling, the draft token is drawn from q = the draft's
logits processed by :func:`~paradecode.sampling.target_probs` (same
temperature/top-k/top-p as the target) and q travels with the draft, so the
verifier's min(1, p/q) test keeps the target distribution exact. The draft
samples with its own generator, seeded differently from the verifier's: the
two random streams must be independent.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..decoding.speculative import Drafter
from ..decoding.tree import Draft
from ..decoding.verify import Verdict
from ..methods.base import check, check_range, option
from ..models.base import CausalLM, KVCache
from ..sampling import GenerationConfig, argmax, sample, target_probs
from ..stats import DecodeStats

Schedule = Literal["heuristic", "constant"]
MIN_SIBLING_PROB = 0.05     # a sibling leaf the draft gives less than this is not worth a verification row


@dataclass(frozen=True)
class ChainDraftOptions:
    """Options every chain drafter shares (draft length and early stopping)."""

    num_draft_tokens: int = option(4, "draft tokens per step at the start (k)")
    min_draft_tokens: int = option(1, "lower bound for k under the heuristic schedule")
    max_draft_tokens: int = option(12, "upper bound for k under the heuristic schedule")
    schedule: Schedule = option("heuristic", "heuristic: k+2 when all drafted tokens are accepted, "
                                             "k-1 otherwise; constant: always k")
    confidence_threshold: float = option(0.4, "stop drafting once the draft's probability of its token "
                                              "falls below this (0 disables)")
    backoff: bool = option(True, "fall back to plain steps while drafts are rejected or cost more per token "
                                 "than plain decoding")
    size_drafts: bool = option(True, "pick each call's draft budget for the most tokens per second expected from recent calls (with backoff)")
    siblings: int = option(0, "also propose the draft's next-likeliest tokens (up to this many per position, "
                              f"each with probability ≥ {MIN_SIBLING_PROB}) as leaves beside the chain, verified "
                              "in the same call (a tree; 0: a chain)")

    def validate(self) -> None:
        check(self.min_draft_tokens >= 1, "min_draft_tokens", f"must be ≥ 1, got {self.min_draft_tokens}",
              "pass 1 or more")
        check(self.max_draft_tokens >= self.min_draft_tokens, "max_draft_tokens",
              f"must be ≥ min_draft_tokens ({self.min_draft_tokens}), got {self.max_draft_tokens}",
              "raise max_draft_tokens or lower min_draft_tokens")
        check_range(self.max_draft_tokens, 1, 64, "max_draft_tokens", 12)
        check(self.min_draft_tokens <= self.num_draft_tokens <= self.max_draft_tokens, "num_draft_tokens",
              f"must lie in [{self.min_draft_tokens}, {self.max_draft_tokens}], got {self.num_draft_tokens}",
              "pick a value between min_draft_tokens and max_draft_tokens")
        check(0.0 <= self.confidence_threshold < 1.0, "confidence_threshold",
              f"must be in [0, 1), got {self.confidence_threshold}", "use e.g. 0.3, or 0 to disable")
        check_range(self.siblings, 0, 3, "siblings", 1)

    def chain_options(self) -> "ChainDraftOptions":
        """Just the shared fields (method configs subclass this one)."""
        return ChainDraftOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ChainDraftOptions)})


def next_draft_length(k: int, drafted: int, accepted: int, lo: int, hi: int, schedule: Schedule) -> int:
    """The draft length for the next step (transformers' ``heuristic`` schedule).

    >>> next_draft_length(4, drafted=4, accepted=4, lo=1, hi=12, schedule="heuristic")
    6
    >>> next_draft_length(4, drafted=4, accepted=2, lo=1, hi=12, schedule="heuristic")
    3
    """
    if schedule == "constant" or drafted == 0:
        return k
    k = k + 2 if accepted >= drafted else k - 1
    return max(lo, min(hi, k))


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists.

    >>> common_prefix([1, 2, 3, 4], [1, 2, 5])
    2
    """
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def draft_seed(seed: int | None) -> int | None:
    """A seed for the draft's sampler, distinct from the verifier's ``seed`` (independent streams)."""
    return None if seed is None else (seed * 1_000_003 + 0x5EED) % (2**63)


class ChainDrafter(Drafter):
    """Proposes a chain by running a causal draft LM token by token on its own cache.

    Subclasses say what the draft LM is by overriding :meth:`setup`, which
    returns the draft cache; :meth:`draft_forward` runs the draft on new tokens.
    """

    reads_logits = False     # learns from the verdict only

    def __init__(self, options: ChainDraftOptions):
        self.opt = options
        self.max_nodes = options.max_draft_tokens     # what the loop's back-off may grant at most
        self.k = options.num_draft_tokens
        self.cache: KVCache | None = None
        self.cached: list[int] = []           # the tokens whose draft keys/values fill the cache
        self.last_drafted = 0
        self._proposal: tuple[int, list[int]] = (0, [])   # (context length, chain + tail) of the last draft
        self.prompt_len = 0
        self.gen: GenerationConfig | None = None
        self.stats: DecodeStats | None = None
        self.generator: torch.Generator | None = None

    # -- what subclasses provide ----------------------------------------------
    @abstractmethod
    def setup(self, model: CausalLM, prompt_ids: list[int], gen: GenerationConfig, capacity: int) -> KVCache:
        """Prepare the draft LM; return its (possibly pre-filled) cache. ``self.cached`` must match it."""

    @abstractmethod
    def draft_forward(self, cache: KVCache, ids: torch.Tensor, logits_for: torch.Tensor) -> torch.Tensor:
        """Run the draft on new tokens ids (1, T) after the cache: logits (1, T', V) at ``logits_for``."""

    def free_tail(self, context: list[int], drafted: list[int], room: int) -> list[int]:
        """Up to ``room`` tokens that may follow ``context + drafted`` at no cost (none by default).

        Asked after every drafted token; a non-empty answer ends the draft LM's
        chain there and is appended as deterministic nodes (one-hot q)."""
        return []

    # -- Drafter interface ----------------------------------------------------
    def begin(self, model: CausalLM, prompt_ids: list[int], gen: GenerationConfig, stats: DecodeStats) -> None:
        self.gen, self.stats = gen, stats
        self.prompt_len = len(prompt_ids)
        self.k = self.opt.num_draft_tokens
        self.cached = []
        self.last_drafted = 0
        seed = draft_seed(gen.seed)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        # context ≤ prompt + max_new_tokens; the draft cache also holds up to k-1 draft tokens
        capacity = min(len(prompt_ids) + gen.max_new_tokens + self.opt.max_draft_tokens + 1, model.max_context)
        self.cache = self.setup(model, prompt_ids, gen, capacity)
        stats.extra["draft_lengths"] = {}                 # drafted length -> how many steps

    def propose(self, context: list[int], max_nodes: int) -> Draft:
        produced = len(context) - self.prompt_len
        # the loop keeps at most remaining - 1 draft tokens (the call adds one of its own)
        k = min(self.k, max_nodes, self.cache.capacity - len(context) + 1, self.gen.max_new_tokens - produced - 1)
        if k <= 0:
            self.last_drafted = 0
            self._proposal = (len(context), [])
            return Draft.empty()
        logits = self._catch_up(context)                             # (V,)
        tokens: list[int] = []
        qs: list[torch.Tensor] = []
        tail: list[int] = []
        probs: list[float] = []                       # the draft's probability of each chain token
        alternatives: list[list[tuple[int, float]]] = []   # per position: (token, probability) of siblings
        for i in range(k):
            tok, q = self._pick(logits)
            tokens.append(tok)
            if q is not None:
                qs.append(q)
            soft = logits.softmax(-1) if self.opt.siblings and q is None else None     # (V,), reused below
            if self.opt.siblings:
                dist = q if q is not None else soft
                top_p, top_t = dist.topk(self.opt.siblings + 1)
                probs.append(float(dist[tok]))
                alternatives.append([(int(t), float(pr)) for t, pr in zip(top_t, top_p)
                                     if int(t) != tok and float(pr) >= MIN_SIBLING_PROB][:self.opt.siblings])
            tail = self.free_tail(context, tokens, max_nodes - len(tokens))
            if tail or i == k - 1:
                break
            confidence = float((soft if soft is not None else logits.softmax(-1))[tok])
            if confidence < self.opt.confidence_threshold:
                break
            logits = self._feed([tok])
        self.last_drafted = len(tokens)
        hist = self.stats.extra["draft_lengths"]
        hist[len(tokens)] = hist.get(len(tokens), 0) + 1
        chain = Draft.chain(tokens, q=torch.stack(qs) if qs else None).then(Draft.chain(tail))  # q: (n, V) or None
        self._proposal = (len(context), chain.tokens)
        if not any(alternatives):
            return chain
        return self._with_siblings(chain, len(tokens), probs, alternatives, max_nodes)

    def _with_siblings(self, chain: Draft, drafted: int, probs: list[float],
                       alternatives: list[list[tuple[int, float]]], max_nodes: int) -> Draft:
        """``chain`` (``drafted`` draft-LM tokens, then a free tail) plus sibling leaves: the ``max_nodes``
        likeliest nodes, likeliest first.

        A node's priority is the draft's probability of its path (a free tail's tokens count as certain);
        the nodes are listed by falling priority, so a budget that keeps the first b nodes keeps the b
        likeliest. That order is topological (a child is never likelier than its parent, and ties keep the
        parent first). A sibling is a deterministic draft (one-hot q), ranked no higher than the chain token
        beside it, so when sampling the verifier tries the chain token, drawn from q, first: rejection then
        leaves the residual of q, and a deterministic candidate tried against it keeps the output exact.
        """
        n = len(chain)
        path = []                                     # priority of chain node i
        p = 1.0
        for i in range(n):
            p *= probs[i] if i < drafted else 1.0
            path.append(p)
        tokens, parents, priority = list(chain.tokens), list(chain.parents), list(path)
        for i, alts in enumerate(alternatives):
            above = path[i - 1] if i else 1.0
            for tok, pr in alts:
                tokens.append(tok)
                parents.append(i - 1)
                priority.append(min(above * pr, path[i]))
        q = None
        if chain.q is not None:
            vocab = chain.q.shape[-1]
            q = torch.cat([chain.q, F.one_hot(torch.tensor(tokens[n:]), vocab).float()])
        order = sorted(range(len(tokens)), key=lambda j: -priority[j])[:max_nodes]   # stable: ties keep order
        self.stats.extra["sibling_nodes"] = self.stats.extra.get("sibling_nodes", 0) + sum(j >= n for j in order)
        return Draft(tokens, parents, q).select(order)

    def observe(self, context: list[int], verdict: Verdict, logits: torch.Tensor) -> None:
        drafted = self.own_drafted(verdict)     # k learns from the draft LM's own tokens
        if self.opt.siblings:
            self._count_sibling_hits(context, verdict)
        o = self.opt
        self.k = next_draft_length(self.k, drafted, min(verdict.num_accepted, drafted), o.min_draft_tokens,
                                   o.max_draft_tokens, o.schedule)

    def own_drafted(self, verdict: Verdict) -> int:
        """The draft LM's own tokens (not a free tail) in the verified draft, as many as survived truncation."""
        return self.last_drafted if verdict.draft is None else min(self.last_drafted, verdict.draft.depth)

    def _count_sibling_hits(self, context: list[int], verdict: Verdict) -> None:
        """Count the calls whose accepted path ends on a sibling leaf (``stats.extra["sibling_hits"]``)."""
        start, chain = self._proposal
        first = len(context) - len(verdict.tokens)              # where the verified call's tokens begin
        for j, tok in enumerate(verdict.tokens[:verdict.num_accepted]):
            d = first + j - start                               # depth in this drafter's proposal
            if 0 <= d < len(chain) and tok != chain[d]:
                self.stats.extra["sibling_hits"] = self.stats.extra.get("sibling_hits", 0) + 1
                break

    def memory_bytes(self) -> int:
        c = self.cache
        if c is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (getattr(c, "k", None), getattr(c, "v", None))
                   if isinstance(t, torch.Tensor))

    # -- internals --------------------------------------------------------------
    def _catch_up(self, context: list[int]) -> torch.Tensor:
        """Roll the draft cache back to what still matches ``context``, feed the rest; last logits (V,)."""
        n = min(common_prefix(self.cached, context), len(context) - 1)  # feed ≥ 1 token to get logits
        self.cache.rollback(n)
        del self.cached[n:]
        return self._feed(context[n:])

    def _feed(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long)                        # (1, T)
        with torch.inference_mode():
            logits = self.draft_forward(self.cache, x, torch.tensor([len(ids) - 1]))  # (1, 1, V)
        self.cached.extend(ids)
        self.stats.draft_calls += 1
        return logits[0, -1]

    def _pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """The draft token and, when sampling, its distribution q (V,)."""
        if self.gen.greedy:
            return int(argmax(logits)), None
        q = target_probs(logits, self.gen)                              # (V,)
        return int(sample(q, self.generator)), q


class SharedCacheDrafter(ChainDrafter):
    """A chain drafter that is a cheaper version of the target and drafts on the target's own cache.

    The committed tokens' keys/values are the target's (better than the
    draft's own would be), and there is no prompt to prefill and no state to
    catch up: each step feeds the root and the draft's own tokens, then rolls
    the cache back so the verification call writes from where it found it.
    Subclasses give :meth:`draft_forward` (the cheaper forward pass).
    """

    def __init__(self, options: ChainDraftOptions):
        super().__init__(options)
        self.target_cache: KVCache | None = None

    def share_cache(self, cache: KVCache) -> None:
        self.target_cache = cache

    def setup(self, model: CausalLM, prompt_ids: list[int], gen: GenerationConfig, capacity: int) -> KVCache:
        if self.target_cache is None:
            raise RuntimeError("SharedCacheDrafter needs the loop to share the target's cache first")
        return self.target_cache

    def propose(self, context: list[int], max_nodes: int) -> Draft:
        start = self.cache.length                     # the target cache holds context[:start]
        try:
            return super().propose(context, max_nodes)
        finally:
            self.cache.rollback(start)
            self.cached.clear()

    def _catch_up(self, context: list[int]) -> torch.Tensor:
        """The target cache holds every committed token but the root: feed just the root."""
        return self._feed(context[self.cache.length:])

    def memory_bytes(self) -> int:
        return 0                                      # the cache is the target's

