"""Lookahead decoding: n-gram pool, the 2-D window mask, greedy exactness, exact sampling."""

from __future__ import annotations

import itertools
from collections import Counter

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

import paradecode as pd
from paradecode.decoding.ngram_pool import NGramPool, lookup_continuation, ngrams_of
from paradecode.decoding.tree import path_to
from paradecode.methods.lookahead import candidate_tree, lookahead_layout
from paradecode.models.tiny import tiny_model
from prompts import PROMPTS
from test_speculative import accepted_draft_tokens

# -- the pool ----------------------------------------------------------------


def test_pool_insert_lookup_most_recent_first():
    pool = NGramPool(per_key=3, capacity=10)
    pool.extend([(1, 2, 3), (1, 4, 5), (2, 2, 2)])
    assert pool.lookup(1) == [(4, 5), (2, 3)]
    assert pool.lookup(2) == [(2, 2)]
    assert pool.lookup(9) == []
    assert pool.lookup(1, limit=1) == [(4, 5)]
    pool.add((1, 2, 3))                      # re-inserting refreshes, no duplicate
    assert pool.lookup(1) == [(2, 3), (4, 5)] and len(pool) == 3


def test_pool_evicts_oldest_of_a_full_key():
    pool = NGramPool(per_key=2, capacity=10)
    pool.extend([(1, 10), (1, 11), (1, 12)])
    assert pool.lookup(1) == [(12,), (11,)] and len(pool) == 2


def test_pool_evicts_least_recently_inserted_when_full():
    pool = NGramPool(per_key=5, capacity=3)
    pool.extend([(1, 10), (2, 20), (3, 30)])
    pool.add((1, 10))                        # refresh: now (2, 20) is the oldest
    pool.add((4, 40))
    assert pool.lookup(2) == [] and pool.lookup(1) == [(10,)] and pool.lookup(4) == [(40,)]
    assert len(pool) == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=2, max_size=3), max_size=40),
       st.integers(1, 3), st.integers(1, 6))
def test_pool_matches_a_reference_model(ngrams, per_key, capacity):
    pool = NGramPool(per_key=per_key, capacity=capacity)
    ref: list[tuple] = []                    # n-grams, least recently inserted first
    for g in ngrams:
        g = tuple(g)
        if g in ref:
            ref.remove(g)
        elif sum(1 for r in ref if r[0] == g[0]) >= per_key:
            ref.remove(next(r for r in ref if r[0] == g[0]))
        elif len(ref) >= capacity:
            ref.pop(0)
        ref.append(g)
        pool.add(g)
    assert len(pool) == len(ref) <= capacity
    for key in range(5):
        assert pool.lookup(key) == [r[1:] for r in reversed(ref) if r[0] == key]


def test_ngram_helpers():
    assert ngrams_of([1, 2, 3], 2) == [(1, 2), (2, 3)]
    assert ngrams_of([1], 2) == []
    assert lookup_continuation([1, 2, 3, 1, 2], 2) == [3, 1]
    assert lookup_continuation([7, 1, 9, 8, 1], 3) == [9, 8, 1]   # one-token match


def test_candidate_tree_merges_prefixes():
    d = candidate_tree([(5, 6), (5, 7), (8,)])
    assert d.tokens == [5, 6, 7, 8] and d.parents == [-1, 0, 0, -1]
    assert candidate_tree([]).tokens == []


# -- the mask ----------------------------------------------------------------

TREES = [[], [-1], [-1, 0], [-1, 0, -1, 2], [-1, -1, 0, 1, 1]]


def _expected_edge(a, b, parents) -> bool:
    """The paper's rule for one (query a, key b) pair, written independently of the implementation."""
    if b[0] == "t0":
        return True
    if a[0] == "t0" or a[0] != b[0]:
        return False                          # branches never see each other
    if a[0] == "la":
        (_, la, ja), (_, lb, jb) = a, b
        return (lb == 0 and jb < ja) or (jb == ja and lb <= la)
    return b[1] in path_to(a[1], parents)     # a verification node: its ancestors and itself


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("parents", TREES)
def test_mask_every_edge(levels, window, parents):
    mask, offsets = lookahead_layout(levels, window, parents)
    names = [("t0",)] + [("la", l, j) for l in range(levels) for j in range(window)] + \
            [("v", i) for i in range(len(parents))]
    assert mask.shape == (len(names), len(names))
    for (i, a), (k, b) in itertools.product(enumerate(names), enumerate(names)):
        assert bool(mask[i, k]) == _expected_edge(a, b, parents), (a, b)
    depth = {i: len(path_to(i, parents)) for i in range(len(parents))}
    want = [0] + [l + j + 1 for l in range(levels) for j in range(window)] + [depth[i] for i in range(len(parents))]
    assert offsets.tolist() == want


def test_mask_gives_each_token_its_column_sequence(tiny):
    """Logits inside one lookahead call equal those of each column's / path's sequence fed alone."""
    torch.manual_seed(1)
    ctx = torch.randint(3, 97, (12,)).tolist()
    t0, levels, W = 5, 2, 3
    lv = [torch.randint(3, 97, (W,)).tolist() for _ in range(levels)]
    draft = candidate_tree([(7, 8), (7, 9, 10), (11,)])
    mask, off = lookahead_layout(levels, W, draft.parents)
    cache = tiny.new_cache(1, 64)
    tiny.forward(cache, torch.tensor([ctx]))
    ids = [t0] + lv[0] + lv[1] + draft.tokens
    got = tiny.forward(cache, torch.tensor([ids]), (len(ctx) + off)[None], mask[None])[0]   # (T, V)

    def alone(seq):
        c = tiny.new_cache(1, 64)
        return tiny.forward(c, torch.tensor([ctx + seq]))[0, -1]
    for l in range(levels):
        for j in range(W):
            seq = [t0] + lv[0][:j] + [lv[k][j] for k in range(l + 1)]
            torch.testing.assert_close(got[1 + l * W + j], alone(seq), atol=1e-4, rtol=1e-4)
    for i in range(len(draft)):
        seq = [t0] + [draft.tokens[n] for n in path_to(i, draft.parents)]
        torch.testing.assert_close(got[1 + levels * W + i], alone(seq), atol=1e-4, rtol=1e-4)


# -- greedy exactness --------------------------------------------------------

CONFIGS = [{}, dict(window=4, ngram=4, guesses=3), dict(window=2, ngram=2, guesses=1, prompt_seed=False),
           dict(window=5, ngram=3, guesses=5, pool_size=8)]


def test_greedy_identical_to_plain_on_all_prompts(default_model):
    accepted = 0
    for i, prompt in enumerate(PROMPTS):
        ref = pd.generate(default_model, prompt, "plain", chat=True, max_new_tokens=24)
        out = pd.generate(default_model, prompt, "lookahead", CONFIGS[i % len(CONFIGS)], chat=True,
                          max_new_tokens=24)
        assert out.token_ids == ref.token_ids, (prompt, CONFIGS[i % len(CONFIGS)])
        assert out.finish_reason == ref.finish_reason
        accepted += accepted_draft_tokens(out.stats)
    # the verification branch accepts 80 tokens over the 22 prompts (45 from the prompt's n-grams alone)
    assert accepted > 40, accepted


@settings(max_examples=25, deadline=None)
@given(prompt=st.lists(st.integers(3, 96), min_size=1, max_size=24), window=st.integers(1, 5),
       ngram=st.integers(2, 5), guesses=st.integers(0, 4), pool_size=st.integers(1, 64),
       prompt_seed=st.booleans(), max_new=st.integers(1, 24))
def test_greedy_identical_on_tiny_models(tiny, prompt, window, ngram, guesses, pool_size, prompt_seed, max_new):
    opts = dict(window=window, ngram=ngram, guesses=guesses, pool_size=pool_size, prompt_seed=prompt_seed)
    ref = pd.generate(tiny, prompt, "plain", max_new_tokens=max_new)
    out = pd.generate(tiny, prompt, "lookahead", opts, max_new_tokens=max_new)
    assert out.token_ids == ref.token_ids
    assert sum(out.stats.accepted_lengths) >= len(out.token_ids)


@pytest.mark.parametrize("config", CONFIGS)
def test_trajectory_ngrams_are_accepted_on_tiny_models(tiny, config):
    """The companion of the property test above, many of whose examples accept nothing: on random prompts
    (no prompt seeding) the pool holds only what the Jacobi window produced, and its n-grams are accepted
    (30 to 43 tokens over the 6 prompts per config; a window whose n-grams never reach the pool gets 0)."""
    opts = config | {"prompt_seed": False}
    accepted = 0
    for seed in range(6):
        prompt = random.Random(seed).choices(range(3, 97), k=12)
        ref = pd.generate(tiny, prompt, "plain", max_new_tokens=24, ignore_eos=True)
        out = pd.generate(tiny, prompt, "lookahead", opts, max_new_tokens=24, ignore_eos=True)
        assert out.token_ids == ref.token_ids
        accepted += accepted_draft_tokens(out.stats)
    assert accepted >= 15, accepted


@pytest.mark.parametrize("spare", [2, 5, 9])
def test_near_the_context_limit_drafts_shrink_to_fit(tiny, spare):
    """A random prompt that nearly fills the context: wide candidate trees (and carried tokens) must be cut
    to the slots left, never overflow the cache."""
    prompt = random.Random(spare).choices(range(tiny.vocab_size), k=tiny.max_context - spare)  # n-grams for every key
    opts = dict(window=3, ngram=4, guesses=4)
    ref = pd.generate(tiny, prompt, "plain", max_new_tokens=spare, ignore_eos=True)
    out = pd.generate(tiny, prompt, "lookahead", opts, max_new_tokens=spare, ignore_eos=True)
    assert out.token_ids == ref.token_ids


def test_trace_records_calls(tiny):
    out = pd.generate(tiny, [5, 6, 7, 5, 6, 7, 5, 6], "lookahead", dict(window=3, ngram=3, guesses=3),
                      max_new_tokens=20, ignore_eos=True, trace=True)
    assert out.trace[0]["kind"] == "prefill"
    assert [t for r in out.trace for t in r["accepted"]][:20] == out.token_ids
    assert len(out.trace) == out.stats.model_calls


def test_bad_options_are_user_errors():
    with pytest.raises(pd.UserError, match="ngram"):
        pd.get_method("lookahead", {"ngram": "1"})
    with pytest.raises(pd.UserError, match="window"):
        pd.get_method("lookahead", {"window": "0"})


# -- sampling: exact distribution through the shared verifier ---------------


def test_sampling_matches_the_target_distribution():
    """Chi-square test of 3-token outputs on a 5-token vocabulary against the exact target distribution."""
    from scipy.stats import chisquare

    model = tiny_model("llama", vocab_size=5, seed=3)
    # a prompt repeating the model's own greedy text: its n-grams seed the pool with likely candidates
    prompt = ([3] + pd.generate(model, [3], "plain", max_new_tokens=10, ignore_eos=True).token_ids) * 2
    n_tok, T = 3, 0.8
    gen = pd.GenerationConfig(max_new_tokens=n_tok, temperature=T, ignore_eos=True)
    # exact probability of every continuation, from the model itself
    exact = {}
    for seq in itertools.product(range(5), repeat=n_tok):
        cache = model.new_cache(1, 64)
        logits = model.forward(cache, torch.tensor([prompt + list(seq[:-1])]))[0, len(prompt) - 1:]   # (n_tok, V)
        probs = pd.sampling.target_probs(logits, gen)
        exact[seq] = float(torch.prod(probs[torch.arange(n_tok), torch.tensor(seq)]))
    method = pd.get_method("lookahead", dict(window=2, ngram=3, guesses=3))
    runs, counts, multi = 2000, Counter(), 0
    for s in range(runs):
        out = pd.generate(model, prompt, method, gen=pd.GenerationConfig(
            max_new_tokens=n_tok, temperature=T, ignore_eos=True, seed=s))
        counts[tuple(out.token_ids)] += 1
        multi += any(n > 1 for n in out.stats.accepted_lengths)
    assert multi > runs // 5                # the verification branch really accepted tokens
    cells = sorted(exact, key=exact.get, reverse=True)
    big = [c for c in cells if exact[c] * runs >= 5]
    obs = [counts[c] for c in big] + [runs - sum(counts[c] for c in big)]
    exp = [exact[c] * runs for c in big] + [runs * (1 - sum(exact[c] for c in big))]
    assert chisquare(obs, exp).pvalue > 1e-3
