"""The shared draft-and-verify loop: greedy equality with plain decoding for any draft
shape, exact sampling end to end, back-off policy, stopping and capacity edges."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import paradecode as pd
import paradecode.decoding.speculative as spec_mod
import paradecode.decoding.verify as verify_mod
from paradecode.decoding.sink import TokenSink
from paradecode.decoding.speculative import BackOff, Drafter, speculative_decode
from paradecode.decoding.tree import Draft
from paradecode.drafters.chain import ChainDrafter
from paradecode.models.tiny import tiny_model
from paradecode.sampling import GenerationConfig, target_probs


def run(model, drafter, prompt, gen, backoff=True) -> TokenSink:
    sink = TokenSink(gen=gen, eos_token_ids=gen.eos_token_ids or model.info.eos_token_ids)
    speculative_decode(model, drafter, prompt, gen, sink, backoff=backoff)
    return sink


def plain(model, prompt, gen) -> list[int]:
    return pd.generate(model, prompt, "plain", gen=gen).token_ids


class OracleTreeDrafter(Drafter):
    """Random trees mixing the true greedy continuation with random tokens."""

    def __init__(self, truth: list[int], n_prompt: int, vocab: int, seed: int, width: int, depth: int,
                 p_true: float):
        self.truth, self.n_prompt, self.vocab = truth, n_prompt, vocab
        self.rng = random.Random(seed)
        self.width, self.depth, self.p_true = width, depth, p_true
        self.max_nodes = width * depth
        self.observed = 0

    def propose(self, context, max_nodes):
        done = len(context) - self.n_prompt
        tokens, parents = [], []
        for b in range(self.rng.randint(0, self.width)):
            parent = -1
            for d in range(self.rng.randint(1, self.depth)):
                i = done + d
                good = i < len(self.truth) and self.rng.random() < self.p_true
                tokens.append(self.truth[i] if good else self.rng.randrange(self.vocab))
                parents.append(parent)
                parent = len(tokens) - 1
                if self.rng.random() < 0.3:     # sometimes fork from an inner node
                    parent = self.rng.randrange(-1, len(tokens))
        return Draft(tokens, parents)

    def observe(self, context, verdict, logits):
        assert logits.shape[0] == len(verdict.draft) + 1
        assert context[-len(verdict.tokens):] == verdict.tokens
        self.observed += 1


@settings(max_examples=12, deadline=None)
@given(prompt=st.lists(st.integers(3, 96), min_size=1, max_size=12), seed=st.integers(0, 10**6),
       width=st.integers(1, 3), depth=st.integers(1, 6), p_true=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       backoff=st.booleans(), n=st.integers(1, 24))
def test_greedy_equals_plain_for_any_tree(tiny, prompt, seed, width, depth, p_true, backoff, n):
    gen = GenerationConfig(max_new_tokens=n, ignore_eos=True)
    truth = plain(tiny, prompt, gen)
    drafter = OracleTreeDrafter(truth, len(prompt), tiny.vocab_size, seed, width, depth, p_true)
    sink = run(tiny, drafter, prompt, gen, backoff)
    assert sink.tokens == truth
    assert sink.stats.model_calls == len(sink.stats.accepted_lengths)   # prefill + one per verify call
    assert sum(sink.stats.accepted_lengths) == len(truth)


def test_perfect_drafts_cut_calls(tiny):
    prompt, gen = [5, 6, 7], GenerationConfig(max_new_tokens=30, ignore_eos=True)
    truth = plain(tiny, prompt, gen)
    sink = run(tiny, OracleTreeDrafter(truth, 3, tiny.vocab_size, 0, 1, 8, 1.0), prompt, gen,
               backoff=BackOff(8, cost_aware=False))
    assert sink.tokens == truth
    assert sink.stats.model_calls < 15 and sink.stats.tokens_per_call > 2
    assert sink.stats.draft_tokens > 0


class SecondBranchDrafter(Drafter):
    """A wrong chain first, the true continuation as the second branch: every call stops off the chain."""

    max_nodes = 16

    def __init__(self, truth: list[int], n_prompt: int, depth: int):
        self.truth, self.n_prompt, self.depth = truth, n_prompt, depth

    def propose(self, context, max_nodes):
        done = len(context) - self.n_prompt
        true = self.truth[done:done + self.depth]
        if not true:
            return Draft.empty()
        wrong = [(true[0] + 1) % 90 + 3, 4]
        return Draft(wrong + true, [-1, 0, -1] + list(range(2, 1 + len(true))))


def test_a_true_second_branch_is_accepted_whole_with_exact_tree_logits(tiny):
    """With the compiled attention every node's logits are exact: the second branch is accepted in the
    call that verifies it, nothing is carried, and each call yields the branch plus a bonus token."""
    assert tiny.exact_tree_logits
    prompt, gen = [5, 6, 7], GenerationConfig(max_new_tokens=42, ignore_eos=True)
    truth = plain(tiny, prompt, gen)
    sink = run(tiny, SecondBranchDrafter(truth, 3, 6), prompt, gen, backoff=False)
    assert sink.tokens == truth
    assert sink.stats.extra.get("carried_tokens", 0) == 0
    assert sink.stats.model_calls <= 1 + -(-(len(truth) - 1) // 7)


def test_a_true_second_branch_is_carried_and_verified_again(tiny_torch_attention):
    """Without exact tree logits, tokens below an off-chain stop are not lost: the next call starts with
    them, as a chain."""
    model = tiny_torch_attention
    assert not model.exact_tree_logits
    prompt, gen = [5, 6, 7], GenerationConfig(max_new_tokens=40, ignore_eos=True)
    truth = plain(model, prompt, gen)
    sink = run(model, SecondBranchDrafter(truth, 3, 6), prompt, gen, backoff=False)
    assert sink.tokens == truth
    assert sink.stats.extra["carried_tokens"] > 0
    assert sink.stats.model_calls < len(truth) / 3     # without the carry every call would yield one token


def test_a_wrong_carry_is_rejected_not_committed(tiny_torch_attention, monkeypatch):
    """The carry is only a draft: a deliberately wrong one costs acceptance, never exactness."""
    model = tiny_torch_attention
    monkeypatch.setattr(verify_mod, "_greedy_walk", lambda probs, draft, children, node: [3, 4, 5])
    prompt, gen = [5, 6, 7], GenerationConfig(max_new_tokens=30, ignore_eos=True)
    truth = plain(model, prompt, gen)
    sink = run(model, SecondBranchDrafter(truth, 3, 6), prompt, gen, backoff=False)
    assert sink.tokens == truth and sink.stats.extra["carried_tokens"] > 0


def test_stops_at_eos_and_near_capacity(tiny):
    gen = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    prompt = [7, 8, 9, 10]
    truth = plain(tiny, prompt, gen)
    eos = truth[6]
    gen_eos = GenerationConfig(max_new_tokens=20, eos_token_ids=(eos,))
    want = plain(tiny, prompt, gen_eos)
    sink = run(tiny, OracleTreeDrafter(truth, 4, tiny.vocab_size, 1, 2, 8, 0.9), prompt, gen_eos)
    assert sink.tokens == want and sink.finish_reason == "eos"
    # a prompt that nearly fills the context window: drafts must shrink to fit
    long_prompt = [3 + (i * 7) % 90 for i in range(tiny.max_context - 10)]
    gen = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    truth = plain(tiny, long_prompt, gen)
    sink = run(tiny, OracleTreeDrafter(truth, len(long_prompt), tiny.vocab_size, 2, 3, 8, 1.0), long_prompt, gen)
    assert sink.tokens == truth


def test_backoff_probes_are_short():
    """A probe carries at most ``probe_nodes`` (a padded call's free rows); a probe accepted whole restores
    the full budget."""
    b = BackOff(8, first_wait=2, min_accept=0.5, alpha=0.5, ema=0.2, cost_aware=False, probe_nodes=3)
    assert [b.allow() for _ in range(1)] == [3]            # struggling from the start: a short probe
    b.update(3, 0)                                         # failed: wait, then probe short again
    assert [b.allow() for _ in range(5)] == [0, 0, 0, 0, 3]
    b.update(3, 3)                                         # accepted whole: ema 1.55, the full budget
    assert b.allow() == 8


def test_the_decode_loop_probes_with_probe_nodes(tiny, monkeypatch):
    """``speculative_decode``'s own back-off probes with PROBE_NODES nodes."""
    made = []

    class Recorded(BackOff):
        def __post_init__(self):
            super().__post_init__()
            made.append(self)

    monkeypatch.setattr(spec_mod, "BackOff", Recorded)
    prompt, gen = [5, 6, 7], GenerationConfig(max_new_tokens=8, ignore_eos=True)
    assert run(tiny, SecondBranchDrafter(plain(tiny, prompt, gen), 3, 2), prompt, gen).tokens
    assert len(made) == 1 and made[0].probe_nodes == spec_mod.PROBE_NODES < made[0].max_nodes


def test_backoff_policy():
    b = BackOff(8, first_wait=2, max_wait=8, min_accept=0.5, alpha=0.5, ema=1.5, cost_aware=False)
    assert b.allow() == 8
    b.update(8, 0)                                         # ema 0.75: shrink
    assert b.allow() == 4
    b.update(4, 0)                                         # ema 0.375: plain steps
    assert [b.allow() for _ in range(3)] == [0, 0, 8]      # two plain steps, then a probe
    b.update(8, 0)                                         # failed probe: the wait doubles
    assert [b.allow() for _ in range(5)] == [0, 0, 0, 0, 8]
    b.update(8, 3)                                         # a good probe: ema ~1.6, full budget again
    assert b.allow() == 8 and b.plain_steps == 6
    b.update(0, 0)                                         # empty drafts teach nothing
    assert b.allow() == 8
    b.update(8, 0)
    b.update(8, 0)                                         # fell below: wait is back to first_wait
    assert [b.allow() for _ in range(3)] == [0, 0, 8]
    fixed = BackOff(5, enabled=False)
    for _ in range(5):
        fixed.update(5, 0)
    assert fixed.allow() == 5


# -- exact sampling end to end ------------------------------------------------------------------
VOCAB = 12


@pytest.fixture(scope="module")
def small():
    return tiny_model("llama", vocab_size=VOCAB, seed=3)


SHARP = 2.0


class MarkovDrafter(Drafter):
    """Draws chains (or trees of iid siblings) from a fixed random next-token table, with q."""

    def __init__(self, gen, width: int, depth: int, seed: int = 0):
        g = torch.Generator().manual_seed(0)
        self.table = target_probs(torch.randn(VOCAB, VOCAB, generator=g) * SHARP, gen)   # (V, V)
        self.width, self.depth = width, depth
        self.max_nodes = width * depth
        self.g = torch.Generator().manual_seed(seed + 1)

    def propose(self, context, max_nodes):
        tokens, parents, qs = [], [], []
        for _ in range(self.width):
            last, parent = context[-1], -1
            for _ in range(self.depth):
                q = self.table[last]
                last = int(torch.multinomial(q, 1, generator=self.g))
                tokens.append(last)
                parents.append(parent)
                qs.append(q)
                parent = len(tokens) - 1
        return Draft(tokens, parents, torch.stack(qs))


# [3, 4, 5] + the small model's greedy continuation: lookups find what the model tends to say
PROMPT = [3, 4, 5, 9, 0, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]


def exact_marginals(model, prompt, gen):
    """Exact P(t1, t2) and P(t2, t3) of plain sampling, from the model's own probabilities."""
    V = model.vocab_size

    def probs(seqs):                                         # list of sequences -> (N, V)
        c = model.new_cache(len(seqs), len(seqs[0]))
        return target_probs(model.forward(c, torch.tensor(seqs))[:, -1], gen)

    p1 = probs([prompt])[0]                                  # (V,)
    p2 = probs([prompt + [a] for a in range(V)])             # (V, V): [a, b]
    p3 = probs([prompt + [a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    joint = p1[:, None, None] * p2[:, :, None] * p3          # (V, V, V)
    return joint.sum(2), joint.sum(0)


def chi2_pvalue(counts, probs):
    counts, probs = counts.flatten().double(), probs.flatten().double()
    probs = probs / probs.sum()
    assert counts[probs == 0].sum() == 0
    exp = probs * counts.sum()
    small = exp < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp > 0
    exp = exp * (obs[keep].sum() / exp[keep].sum())
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


def accepted_draft_tokens(stats) -> int:
    """Draft tokens a decode accepted: every call's accepted length minus its recovered/bonus token."""
    return sum(n - 1 for n in stats.accepted_lengths)


def sample_counts(model, make_run, n):
    """Counts of (t1, t2) and (t2, t3) over n seeds; checks drafts were accepted and rejected along the way."""
    V = model.vocab_size
    counts12 = torch.zeros(V, V)
    counts23 = torch.zeros(V, V)
    accepted = drafted = 0
    for seed in range(n):
        t, stats = make_run(seed)
        counts12[t[0], t[1]] += 1
        counts23[t[1], t[2]] += 1
        accepted += accepted_draft_tokens(stats)
        drafted += stats.draft_tokens
    assert accepted > n // 4, "the drafts were hardly ever accepted: the test would not exercise them"
    assert drafted - accepted > n // 4, "the drafts were hardly ever rejected: a wrong residual would not show"
    return counts12, counts23


def exactness_pvalue(model, prompt, make_run, n, gen: dict) -> float:
    """The smaller chi-square p-value of (t1, t2) and (t2, t3) over ``n`` runs against plain sampling (``gen``:
    the GenerationConfig fields of the runs)."""
    c12, c23 = sample_counts(model, make_run, n)
    e12, e23 = exact_marginals(model, prompt, GenerationConfig(**gen))
    return min(chi2_pvalue(c12, e12), chi2_pvalue(c23, e23))


class _ScaledRand:
    """``torch`` as the verifier sees it, but ``rand`` divided by 1.5: ``u * q < r`` becomes ``u * q < 1.5 * r``."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def rand(*args, **kwargs):
        return torch.rand(*args, **kwargs) / 1.5


_pick = ChainDrafter._pick
# Deliberately wrong sampling, for negative controls: each must make the statistical tests fail (p < 1e-6).
MUTATIONS = {
    # no residual: after a rejection the next candidate and the recovered token are judged against r itself
    "A-no-residual": lambda mp: mp.setattr(verify_mod, "residual", lambda r, q: r),
    # too generous: accept x when u * q(x) < 1.5 * r(x)
    "B-accept-1.5x": lambda mp: mp.setattr(verify_mod, "torch", _ScaledRand()),
    # a chain drafter samples with temperature/top-k but reports q as its raw softmax
    "C-q-untempered": lambda mp: mp.setattr(ChainDrafter, "_pick",
                                            lambda self, logits: (_pick(self, logits)[0], logits.softmax(-1))),
}


GEN = dict(max_new_tokens=4, temperature=1.0, ignore_eos=True)
DRAFTERS = {   # the draft's randomness must be fresh in every run: its tokens are draws from q
    "chain_q": lambda gen: MarkovDrafter(gen, 1, 3, seed=10_000 + gen.seed),
    "tree_iid_q": lambda gen: MarkovDrafter(gen, 3, 2, seed=10_000 + gen.seed),
}


def _loop_run(small, name):
    def make(seed):
        gen = GenerationConfig(seed=seed, **GEN)
        sink = run(small, DRAFTERS[name](gen), PROMPT, gen, backoff=False)
        return sink.tokens, sink.stats
    return make


def method_run(model, prompt, method, options, gen: dict):
    """A ``make_run`` for :func:`sample_counts`: ``method`` with ``options`` and ``gen``, seeded per run."""
    def make(seed):
        out = pd.generate(model, prompt, method, options, seed=seed, **gen)
        return out.token_ids, out.stats
    return make


RUNS = 2000     # with 500, chain_q and tree_iid_q passed under MUTATIONS["B-accept-1.5x"]


@pytest.mark.parametrize("source", ["chain_q", "tree_iid_q", "pld", "ngram", "recycle"])
def test_sampling_end_to_end_matches_plain_distribution(small, source):
    make = _loop_run(small, source) if source in DRAFTERS else \
        method_run(small, PROMPT, source, {"backoff": False}, GEN)
    assert exactness_pvalue(small, PROMPT, make, RUNS, GEN) > 1e-4


@pytest.mark.parametrize("mutation", ["A-no-residual", "B-accept-1.5x"])
def test_sampling_end_to_end_negative_control(small, monkeypatch, mutation):
    """The test above, with a wrong verifier, must fail. (MarkovDrafter's q is its own: C does not apply.)"""
    MUTATIONS[mutation](monkeypatch)
    assert exactness_pvalue(small, PROMPT, _loop_run(small, "chain_q"), RUNS, GEN) < 1e-6


def test_backoff_is_cost_aware():
    """Drafts that are accepted but cost more per token than plain steps are dropped, then probed again."""
    b = BackOff(8, first_wait=2, max_wait=8, alpha=1.0, min_samples=1)
    assert b.allow() == 0                                  # the first step is plain: measure its cost
    b.update(0, 0, seconds=0.010)
    assert b.allow() == 8
    b.update(8, 1, seconds=0.040)                          # 20 ms per token > 10 ms: too costly
    # it lost 20 ms against two plain steps: 50 plain steps amortise that to 4%, capped at max_wait
    assert [b.allow() for _ in range(9)] == [0] * 8 + [8]  # plain steps, then a probe
    b.update(0, 0, seconds=0.010)
    b.update(8, 7, seconds=0.040)                          # 5 ms per token: drafting pays again
    assert b.allow() == 8
    cheap = BackOff(8, first_wait=2, max_wait=64, alpha=1.0, min_samples=1)
    cheap.allow()
    cheap.update(0, 0, seconds=0.010)
    cheap.update(8, 0, seconds=0.0105)                     # a free draft rejected: lost 0.5 ms only
    assert [cheap.allow() for _ in range(3)] == [0, 0, 8]  # so it probes again soon
    off = BackOff(8, alpha=1.0, cost_aware=False)
    assert off.allow() == 8
    off.update(8, 1, seconds=1.0)
    assert off.allow() == 8


def test_backoff_costs_decide_only_after_min_samples_drafted_calls():
    """One costly draft rejected at its first token does not end drafting; three do (then a long wait)."""
    b = BackOff(8, first_wait=2, max_wait=64, alpha=0.3)
    assert b.allow() == 0
    b.update(0, 0, seconds=0.010)
    assert b.allow() == 8
    b.update(8, 0, seconds=0.080)                          # 80 ms for one token: 8x a plain step
    assert b.allow() == 8                                  # one sample: acceptance (ema 1.05) still decides
    b.update(8, 0, seconds=0.080)
    assert b.allow() == 4                                  # ema 0.74: half the budget
    b.update(4, 0, seconds=0.050)
    assert [b.allow() for _ in range(64)] == [0] * 64      # three samples: the cost decides, a long wait


def test_backoff_resumes_what_it_learned():
    """A later request starts from the earlier one's costs: a drafter that did not pay waits first."""
    b = BackOff(8, first_wait=2, max_wait=8, alpha=1.0, min_samples=1)
    b.allow()
    b.update(0, 0, seconds=0.010)
    b.update(8, 0, seconds=0.040)                          # costly and rejected
    later = BackOff(8, first_wait=2, max_wait=8, alpha=1.0).restore(b.snapshot())
    assert later.plain_cost == b.plain_cost and later.draft_cost == b.draft_cost
    assert later.allow() == 0                              # no new plain-cost measurement, no early probe
    assert later.wait == b.wait - 1 == 7                   # as long a wait as the failed draft earned
    fresh = BackOff(8).restore(None)
    assert fresh.allow() == 0 and fresh.plain_cost is None  # nothing learned: measure a plain step first
    good = BackOff(8, alpha=1.0)
    good.allow()
    good.update(0, 0, seconds=0.010)
    good.update(8, 8, seconds=0.020)
    assert BackOff(8).restore(good.snapshot()).allow() == 8


def _sized(max_nodes: int, calls: list[tuple[int, list[int]]], seconds_per_token: float, base: float) -> BackOff:
    """A policy that saw a plain step (``base`` s) and full-budget drafted calls of (nodes proposed, proposal
    positions of the accepted nodes), each costing ``base + seconds_per_token * nodes``."""
    b = BackOff(max_nodes, alpha=1.0, explore_every=1000, min_samples=1)
    b.allow()
    b.update(0, 0, seconds=base)
    for n, path in calls:
        b.update(n, len(path), seconds=base + seconds_per_token * n, budget=max_nodes, path=path)
    return b


def test_sizing_picks_the_budget_with_the_most_tokens_per_second():
    """Drafts accepted 0-2 nodes deep, calls costing more per node: a short budget; drafts accepted whole and
    calls nearly free per node: the cap. What a smaller budget would have kept is the accepted nodes among
    the first b proposed (positions), so a tree whose accepted path runs through late nodes keeps the cap."""
    shallow = [(15, [0]), (15, []), (15, [0, 1]), (15, [0]), (15, [])] * 2
    assert _sized(15, shallow, seconds_per_token=0.002, base=0.010).allow() == 3
    deep = [(15, list(range(15)))] * 6
    assert _sized(15, deep, seconds_per_token=0.0002, base=0.010).allow() == 15
    late = [(15, [0, 9, 14])] * 6                          # a tree: the accepted path reaches nodes 9 and 14
    assert _sized(15, late, seconds_per_token=0.0005, base=0.010).allow() == 15
    # calls that cost nothing per node: the larger budget pays only through its tokens, and ties go short
    assert _sized(15, [(15, [0])] * 6, seconds_per_token=0.0, base=0.010).allow() == 3


def test_sizing_explores_the_cap_and_learns_only_from_what_a_call_could_show():
    """Every explore_every-th drafted call uses the cap; calls verified with a small budget tell nothing about
    larger ones; without proposal positions the cap is used as before."""
    b = BackOff(15, alpha=1.0, explore_every=4)
    b.allow()
    b.update(0, 0, seconds=0.010)
    for _ in range(6):                                     # only budget-3 calls seen: nothing known above 3
        b.update(3, 1, seconds=0.012, budget=3, path=[0])
    sizes = [b.allow() for _ in range(8)]
    assert sizes.count(15) == 2 and set(sizes) == {3, 15}  # the cap is tried every 4th call
    plain = BackOff(15, alpha=1.0)
    plain.allow()
    plain.update(0, 0, seconds=0.010)
    for _ in range(6):
        plain.update(15, 1, seconds=0.012)                 # no positions given
    assert plain.allow() == 15
