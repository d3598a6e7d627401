"""The verifier: greedy path matching, and exact sampling checked statistically.

The statistical tests use a synthetic target: a Markov chain over a vocabulary
of 8 tokens (the target's logits at a node depend only on its token), and a
deliberately different draft chain Q. Verification steps are repeated until
two tokens are produced; their joint distribution must be P(a) P(b | a) with P
the processed target (temperature/top-k applied). A wrong acceptance rule
(no residual after a rejection) must fail the same test.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import paradecode.decoding.verify as verify_mod
from paradecode.decoding.tree import Draft
from paradecode.decoding.verify import residual, verify
from paradecode.sampling import GenerationConfig, argmax, target_probs

V = 8
ROOT = 0


def _markov(seed: int, sharp: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, V, generator=g) * sharp                     # (V, V) logits of next | last


TARGET = _markov(1, 1.5)
DRAFT = _markov(2, 2.0)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expected < 5 are pooled. Impossible cells must be empty."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    probs = probs / probs.sum()
    assert counts[probs == 0].sum() == 0, "a token outside the target's support was produced"
    n = counts.sum()
    exp = probs * n
    small = exp < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp > 0
    exp = exp * (obs[keep].sum() / exp[keep].sum())
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


# -- drafts ---------------------------------------------------------------------------------------
def _chain(last, gen, g, depth, with_q):
    toks, qs = [], []
    for _ in range(depth):
        q = target_probs(DRAFT[last], gen)                            # (V,)
        last = int(torch.multinomial(q, 1, generator=g))
        toks.append(last)
        qs.append(q)
    return Draft.chain(toks, torch.stack(qs) if with_q else None)


def _tree(last, gen, g, width, kind):
    """`width` siblings below the root, each with one child; siblings drawn per `kind`."""
    q0 = target_probs(DRAFT[last], gen)
    toks, parents, qs = [], [], []
    taken = torch.zeros(V, dtype=torch.bool)
    for _ in range(width):
        if kind == "onehot":                        # deterministic: the draft's top tokens in order
            q = q0.masked_fill(taken, -1.0)
            x = int(q.argmax())
            qrow = None
        elif kind == "iid":                         # independent draws from q0
            qrow = q0
            x = int(torch.multinomial(q0, 1, generator=g))
        else:                                       # without replacement: q renormalised without earlier siblings
            left = q0.masked_fill(taken, 0.0)
            if float(left.sum()) <= 0:
                break
            qrow = left / left.sum()
            x = int(torch.multinomial(qrow, 1, generator=g))
        taken[x] = True
        toks.append(x)
        parents.append(-1)
        qs.append(qrow)
        # one child under each sibling
        qc = target_probs(DRAFT[x], gen)
        y = int(qc.argmax()) if kind == "onehot" else int(torch.multinomial(qc, 1, generator=g))
        toks.append(y)
        parents.append(len(toks) - 2)
        qs.append(None if kind == "onehot" else qc)
    q = None if kind == "onehot" else torch.stack(qs)
    return Draft(toks, parents, q)


def _draft(kind, last, gen, g):
    if kind == "chain_q":
        return _chain(last, gen, g, 3, True)
    if kind == "chain_onehot":
        return _chain(last, gen, g, 3, False)
    return _tree(last, gen, g, 3, kind.removeprefix("tree_"))


def _logits_for(last, draft):
    rows = [TARGET[last]] + [TARGET[t] for t in draft.tokens]
    return torch.stack(rows)                                          # (n+1, V)


def _first_two(kind, gen, n, seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V)
    for _ in range(n):
        out = []
        last = ROOT
        while len(out) < 2:
            draft = _draft(kind, last, gen, g)
            verdict = verify(_logits_for(last, draft), draft, gen, g)
            out += verdict.tokens
            last = out[-1]
        counts[out[0], out[1]] += 1
    return counts


def _exact_first_two(gen):
    P = target_probs(TARGET, gen)                                     # (V, V): row = last token
    return P[ROOT][:, None] * P                                        # (V, V): P(a) P(b | a)


KINDS = ["chain_q", "chain_onehot", "tree_iid", "tree_onehot", "tree_norepl"]
GENS = {"t1": GenerationConfig(temperature=1.0), "t0.7_k5": GenerationConfig(temperature=0.7, top_k=5),
        "topp": GenerationConfig(temperature=1.2, top_p=0.8)}


CASES = [(k, "t1") for k in KINDS] + [("chain_q", "t0.7_k5"), ("tree_iid", "topp"), ("tree_onehot", "t0.7_k5"),
                                      ("tree_norepl", "topp")]


@pytest.mark.parametrize("kind,gen_name", CASES)
def test_sampling_is_exact(kind, gen_name):
    gen = GENS[gen_name]
    counts = _first_two(kind, gen, 800, seed=zlib.crc32(f"{kind}/{gen_name}".encode()))
    assert chi2_pvalue(counts, _exact_first_two(gen)) > 1e-4


@pytest.mark.parametrize("kind", ["chain_q", "tree_iid", "tree_onehot"])
def test_negative_control_missing_residual_is_detected(monkeypatch, kind):
    """Accepting with min(1, p/q) but resampling from p (not max(0, p - q)) is biased."""
    monkeypatch.setattr(verify_mod, "residual", lambda r, q: r)
    gen = GENS["t1"]
    counts = _first_two(kind, gen, 800, seed=7)
    assert chi2_pvalue(counts, _exact_first_two(gen)) < 1e-6


def test_negative_control_accepting_everything_is_detected():
    """The test has power against a greedy-looking shortcut too: always keeping the draft."""
    gen = GENS["t1"]
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(V, V)
    for _ in range(800):
        d = _chain(ROOT, gen, g, 2, True)
        counts[d.tokens[0], d.tokens[1]] += 1
    assert chi2_pvalue(counts, _exact_first_two(gen)) < 1e-6


def test_residual():
    r = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.7, 0.1, 0.2])
    torch.testing.assert_close(residual(r, q), torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(residual(r, r.clone()), r)             # nothing left: fall back to r


# -- greedy -----------------------------------------------------------------------------------------
def _onehot_logits(argmaxes):
    logits = torch.zeros(len(argmaxes), V)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 5.0
    return logits


def test_greedy_chain_prefix_and_recovered_token():
    gen = GenerationConfig()
    d = Draft.chain([3, 4, 5])
    v = verify(_onehot_logits([3, 4, 7, 1]), d, gen)                   # mismatch at node 2
    assert v.accepted_nodes == [0, 1] and v.tokens == [3, 4, 7]
    v = verify(_onehot_logits([3, 4, 5, 6]), d, gen)                   # all accepted + bonus
    assert v.accepted_nodes == [0, 1, 2] and v.tokens == [3, 4, 5, 6]
    v = verify(_onehot_logits([2, 4, 5, 6]), d, gen)
    assert v.accepted_nodes == [] and v.tokens == [2]
    v = verify(_onehot_logits([6]), Draft.empty(), gen)
    assert v.tokens == [6] and v.draft is not None


def test_greedy_tree_descends_matching_child():
    gen = GenerationConfig()
    #   root ─ 2 ─ 6        pre-order nodes: 0:2  1:7(parent 0)  2:6(parent 0)  3:1  4:5(parent 3)
    #        │   └ 7
    #        └ 1 ─ 5
    d = Draft([2, 7, 6, 1, 5], [-1, 0, 0, -1, 3])
    assert d.chain_prefix == 2
    # target: root -> 2, after 2 -> 7, after 7 -> 4
    logits = _onehot_logits([2, 7, 4, 0, 0, 0])
    v = verify(logits, d, gen)
    assert v.accepted_nodes == [0, 1] and v.tokens == [2, 7, 4]


def test_greedy_tree_stops_at_a_node_outside_the_chain_prefix():
    """A node off the first path has logits that are only close to plain decoding's: its token (chosen by its
    parent's exact logits) ends the call and nothing below it is accepted, even where the draft matched."""
    gen = GenerationConfig()
    d = Draft([2, 7, 6, 1, 5], [-1, 0, 0, -1, 3])          # as above
    logits = _onehot_logits([1, 0, 0, 0, 5, 3])             # root -> 1 (node 3), after 1 -> 5 (node 4)
    v = verify(logits, d, gen)
    assert v.accepted_nodes == [] and v.tokens == [1]
    logits = _onehot_logits([2, 6, 0, 3, 0, 0])             # root -> 2, after 2 -> 6 (node 2, off the prefix)
    v = verify(logits, d, gen)
    assert v.accepted_nodes == [0] and v.tokens == [2, 6]


def test_a_stop_off_the_chain_carries_the_greedy_walk_below_it():
    """What the off-chain node's logits predict is carried to the next call (to be verified again), not committed."""
    gen = GenerationConfig()
    d = Draft([2, 7, 1, 5, 3], [-1, 0, -1, 2, 3])           # chain 2-7; branch 1-5-3
    logits = _onehot_logits([1, 0, 0, 5, 6, 0])          # root -> 1, after 1 -> 5, after 5 -> 6 (not 3)
    v = verify(logits, d, gen)
    assert v.accepted_nodes == [] and v.tokens == [1] and v.carry == [5, 6]
    logits = _onehot_logits([1, 0, 0, 4, 0, 0])          # after 1 -> 4: no child matches
    assert verify(logits, d, gen).carry == [4]
    logits = _onehot_logits([2, 7, 3, 0, 0, 0])          # on the chain: nothing to carry
    v = verify(logits, d, gen)
    assert v.tokens == [2, 7, 3] and v.carry == []


def test_exact_tree_logits_let_the_walk_descend_any_branch():
    """``exact_tree=True`` (every node's logits are its path's, bit for bit): the walk accepts a second
    branch as deep as it matches and adds the bonus token, with nothing to carry."""
    gen = GenerationConfig()
    d = Draft([2, 7, 1, 5, 3], [-1, 0, -1, 2, 3])           # chain 2-7; branch 1-5-3
    logits = _onehot_logits([1, 0, 0, 5, 3, 4])          # root -> 1, then 5, then 3, then 4 (bonus)
    v = verify(logits, d, gen, exact_tree=True)
    assert v.accepted_nodes == [2, 3, 4] and v.tokens == [1, 5, 3, 4] and v.carry == []
    logits = _onehot_logits([1, 0, 0, 5, 6, 0])          # after 5 -> 6 (not 3): recovered 6
    v = verify(logits, d, gen, exact_tree=True)
    assert v.accepted_nodes == [2, 3] and v.tokens == [1, 5, 6] and v.carry == []
    probs_gen = GenerationConfig(temperature=1.0)
    v = verify(logits * 50, d, probs_gen, torch.Generator().manual_seed(0), exact_tree=True)
    assert v.accepted_nodes == [2, 3] and v.tokens[:2] == [1, 5] and v.carry == []


# -- the blocked argmax every greedy path uses -------------------------------------------

@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 4), width=st.sampled_from([7, 1023, 4096, 4097, 5000, 49152, 49153]),
       levels=st.integers(1, 5), seed=st.integers(0, 2**31 - 1), nan=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_argmax_is_torch_argmax_ties_and_nan_included(rows, width, levels, seed, nan, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-levels, levels, (rows, width), generator=g).to(dtype)   # few values: many ties
    if nan:
        x.view(-1)[torch.randint(0, x.numel(), (2,), generator=g)] = float("nan")
    assert torch.equal(argmax(x), x.argmax(-1))
    assert torch.equal(argmax(x[0]), x[0].argmax(-1))                          # one row, no batch dimension


def test_argmax_finds_a_maximum_in_the_last_short_block():
    x = torch.zeros(2, 4 * 1024 + 3)
    x[0, -1] = 1.0                                                             # only in the 3-entry tail
    x[1, -3:] = 2.0                                                            # a tie inside the tail
    assert argmax(x).tolist() == [4 * 1024 + 2, 4 * 1024]
