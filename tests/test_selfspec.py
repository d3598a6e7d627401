"""The ``selfspec`` method: the target drafts for itself with some layers skipped.

The skip-set search is a pure function of a score and is tested on synthetic
scores; decoding is compared token for token with plain greedy (tiny models
and the default model over all PROMPTS); with no layer skipped the draft is
the target itself and must be accepted 100%; sampling must follow the exact
target distribution.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paradecode.api import generate
from paradecode.drafters.layer_skip import agreement, calibrate, search_skip_set, seed_sets, skip_count, skippable
from paradecode.errors import UserError
from paradecode.methods.base import get_method
from paradecode.models.tiny import tiny_model

from prompts import PROMPTS
from test_speculative import MUTATIONS, exactness_pvalue, method_run


@pytest.fixture(scope="module")
def deep():
    """A tiny random 6-layer model (vocab 97)."""
    return tiny_model("llama", seed=2, layers=6)


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


# -- the search over skip sets (pure) -------------------------------------------------------------
def test_seed_sets_and_counts():
    assert skippable(6) == [1, 2, 3, 4]
    assert skip_count(30, 0.4) == 12 and skip_count(4, 0.9) == 2 and skip_count(30, 0.0) == 0
    for s in seed_sets(30, 12):
        assert len(s) == 12 and 0 not in s and 29 not in s
    assert seed_sets(30, 0) == [()]


def test_search_finds_the_least_important_layers():
    """With a separable score (sum of per-layer importances) the hill climb reaches the optimum."""
    importance = {i: (i * 7919) % 13 + 1 for i in range(12)}             # arbitrary, distinct-ish costs
    calls = []

    def score(skip):
        calls.append(skip)
        return (-sum(importance[i] for i in skip), 0.0)

    r = search_skip_set(score, 12, 3, steps=60, seed=1)
    best = sorted(skippable(12), key=lambda i: importance[i])[:3]
    assert sum(importance[i] for i in r.skip) == sum(importance[i] for i in best)
    assert len(calls) <= 60 and len(set(calls)) == len(calls)            # budget kept, nothing scored twice


@settings(max_examples=40, deadline=None)
@given(L=st.integers(3, 40), ratio=st.floats(0.0, 0.95), steps=st.integers(0, 15), seed=st.integers(0, 99))
def test_search_invariants(L, ratio, steps, seed):
    n = skip_count(L, ratio)
    calls = []

    def score(skip):
        calls.append(skip)
        return (float(sum(skip) % 5), 0.0)

    r = search_skip_set(score, L, n, steps, seed)
    assert len(r.skip) == n and set(r.skip) <= set(skippable(L)) and list(r.skip) == sorted(r.skip)
    assert len(calls) <= steps
    if calls:
        assert r.score == max(score_ for _, score_ in r.evaluated)
    assert search_skip_set(score, L, n, steps, seed).skip == r.skip  # deterministic


def test_agreement_score():
    ref = torch.tensor([1, 0, 2])
    logits = torch.tensor([[0.0, 3.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    agree, soft = agreement(ref, logits)
    assert agree == pytest.approx(2 / 3) and 0 < soft < agree


def test_calibration_on_a_tiny_model(deep):
    """Calibration chooses a set and leaves the cache as it found it: the prompt, every layer."""
    p = _prompt(20)
    cache = deep.new_cache(1, 40)
    deep.forward(cache, torch.tensor([p]))
    r = calibrate(deep, cache, p, n_skip=2, steps=5, window=8)
    assert len(r.skip) == 2 and set(r.skip) <= {1, 2, 3, 4} and 1 <= len(r.evaluated) <= 5
    assert 0.0 <= r.score[0] <= 1.0
    assert cache.length == len(p)
    nxt = torch.tensor([[5]])
    torch.testing.assert_close(deep.forward(cache, nxt)[0, -1],
                               deep.forward(deep.new_cache(1, 40), torch.tensor([p + [5]]))[0, -1],
                               atol=1e-4, rtol=1e-4)


# -- greedy: identical to plain -------------------------------------------------------------------
def test_no_skipped_layer_is_always_accepted(deep):
    """skip_ratio=0: the draft is the target on its own cache; any cache slip shows as a rejection."""
    p = _prompt(9)
    ref = generate(deep, p, "plain", max_new_tokens=50, ignore_eos=True)
    r = generate(deep, p, "selfspec", {"skip_ratio": 0.0, "confidence_threshold": 0.0, "backoff": False}, max_new_tokens=50,
                 ignore_eos=True)
    assert r.token_ids == ref.token_ids
    assert r.stats.acceptance_rate == 1.0 and r.stats.tokens_per_call > 3
    assert r.stats.extra["skip_layers"] == []


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 24), seed=st.integers(0, 1000), ratio=st.sampled_from([0.2, 0.5, 0.7]),
       steps=st.integers(0, 4), k=st.integers(1, 5), budget=st.integers(1, 30), again=st.booleans())
def test_greedy_matches_plain(deep, n, seed, ratio, steps, k, budget, again):
    p = _prompt(n, seed)
    ref = generate(deep, p, "plain", max_new_tokens=budget, ignore_eos=True)
    r = generate(deep, p, "selfspec", {"skip_ratio": ratio, "calibration_steps": steps, "num_draft_tokens": k,
                                       "confidence_threshold": 0.0, "recalibrate": again},
                 max_new_tokens=budget, ignore_eos=True)
    assert r.token_ids == ref.token_ids
    assert len(r.stats.extra["skip_layers"]) == skip_count(6, ratio)


def test_calibration_is_kept_per_model():
    """The first prompt's calibration serves later requests; ``recalibrate`` runs it again."""
    m = tiny_model("llama", seed=4, layers=6)
    opts = {"skip_ratio": 0.35, "calibration_steps": 4}
    first = generate(m, _prompt(14, 1), "selfspec", opts, max_new_tokens=6, ignore_eos=True).stats.extra
    again = generate(m, _prompt(14, 2), "selfspec", opts, max_new_tokens=6, ignore_eos=True).stats.extra
    fresh = generate(m, _prompt(14, 2), "selfspec", {**opts, "recalibrate": True}, max_new_tokens=6,
                     ignore_eos=True).stats.extra
    assert first["calibration_passes"] == 4 and again["calibration_passes"] == 0
    assert again["skip_layers"] == first["skip_layers"] and fresh["calibration_passes"] == 4


def test_explicit_skip_layers(deep):
    p = _prompt(12, 4)
    r = generate(deep, p, "selfspec", {"skip_layers": "2,3"}, max_new_tokens=30, ignore_eos=True)
    assert r.token_ids == generate(deep, p, "plain", max_new_tokens=30, ignore_eos=True).token_ids
    assert r.stats.extra["skip_layers"] == [2, 3] and r.stats.extra["calibration_passes"] == 0


# -- refusals ------------------------------------------------------------------------------------
def test_refuses_backend_without_layer_skipping(tiny_llama_pair):
    hf, _ = tiny_llama_pair
    with pytest.raises(UserError, match="cannot.*--backend native"):
        generate(hf, _prompt(5), "selfspec", max_new_tokens=5)


def test_bad_options(deep):
    with pytest.raises(UserError, match="skip_ratio"):
        get_method("selfspec", {"skip_ratio": 1.5})
    with pytest.raises(UserError, match="calibration_steps"):
        get_method("selfspec", {"calibration_steps": -1})
    with pytest.raises(UserError, match="skip_layers"):
        generate(deep, _prompt(5), "selfspec", {"skip_layers": "1,9"}, max_new_tokens=5)
    with pytest.raises(UserError, match="skip_layers"):
        generate(deep, _prompt(5), "selfspec", {"skip_layers": "0,1,2,3,4,5"}, max_new_tokens=5)


# -- sampling: exact distribution ------------------------------------------------------------------
# No back-off: it decides from wall-clock cost and drafted ~0.08 tokens a run, so the test compared plain
# sampling with itself. Two layers of four skipped: ~60% of the drafted tokens are accepted, the rest rejected.
# Temperature 0.7 with top-k: a q reported without them (MUTATIONS' C) shows in 1000 runs.
SAMPLING_PROMPT = [3, 7, 4]
SAMPLING_GEN = dict(max_new_tokens=4, temperature=0.7, top_k=3, ignore_eos=True)
SAMPLING_OPTIONS = {"skip_layers": "1,2", "confidence_threshold": 0.0, "schedule": "constant", "num_draft_tokens": 2,
                    "backoff": False}
SAMPLING_RUNS = 1000


@pytest.fixture(scope="module")
def shallow():
    """A tiny random 4-layer model with an 8-token vocabulary (plain sampling's pair law is enumerable)."""
    return tiny_model("llama", seed=5, layers=4, vocab_size=8)


def _sampling_pvalue(model) -> float:
    make = method_run(model, SAMPLING_PROMPT, "selfspec", SAMPLING_OPTIONS, SAMPLING_GEN)
    return exactness_pvalue(model, SAMPLING_PROMPT, make, SAMPLING_RUNS, SAMPLING_GEN)


def test_sampling_is_exact(shallow):
    assert _sampling_pvalue(shallow) > 1e-4


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_sampling_negative_control(shallow, monkeypatch, mutation):
    """The test above, with a wrong acceptance rule or a wrong q, must fail."""
    MUTATIONS[mutation](monkeypatch)
    assert _sampling_pvalue(shallow) < 1e-6


# -- the default model -------------------------------------------------------------------------------
def test_default_model_matches_plain_on_all_prompts(default_model):
    """Greedy token identity with plain on every prompt (short outputs).

    Most prompts use a fixed skip set that SmolLM2 tolerates well (~80% of the
    draft tokens accepted, so accepting and rejecting are both exercised);
    every fifth prompt runs a light calibration instead.
    """
    mismatches, accepted, drafted = [], 0, 0
    for i, prompt in enumerate(PROMPTS):
        options = {"skip_ratio": 0.1, "calibration_steps": 2} if i % 5 == 0 else {"skip_layers": "3,5,25"}
        ref = generate(default_model, prompt, "plain", chat=True, max_new_tokens=20)
        r = generate(default_model, prompt, "selfspec", options, chat=True, max_new_tokens=20)
        if r.token_ids != ref.token_ids:
            mismatches.append(prompt[:40])
        s = r.stats
        assert len(s.extra["skip_layers"]) == 3 and not {0, 29} & set(s.extra["skip_layers"])
        accepted += sum(a - 1 for a in s.accepted_lengths)
        drafted += s.draft_tokens
    assert not mismatches
    assert drafted > 0 and accepted / drafted > 0.3                       # the skipped model is a real draft
