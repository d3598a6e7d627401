"""Jacobi decoding: guesses, greedy exactness for every variant, cache discipline, greedy-only."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import paradecode as pd
from paradecode.methods.jacobi import initial_guesses
from prompts import PROMPTS
from test_speculative import accepted_draft_tokens   # accepted guesses, here


def test_initial_guesses():
    assert initial_guesses([4, 5, 6], 3, "pad", 0) == [0, 0, 0]
    assert initial_guesses([4, 5, 6], 2, "copy", 0) == [5, 6]
    assert initial_guesses([4, 5, 6], 5, "copy", 0) == [4, 5, 6, 4, 5]
    assert initial_guesses([1, 2, 3, 1, 2], 2, "ngram", 0) == [3, 1]
    assert initial_guesses([1, 2, 3], 2, "ngram", 0) == [2, 3]         # no match: copy
    assert initial_guesses([9], 3, "copy", 0) == [9, 9, 9]
    assert initial_guesses([9], 0, "ngram", 0) == []


CONFIGS = [{}, dict(block_size=6, mode="gs-jacobi", init="pad"), dict(init="copy", max_iters=2),
           dict(block_size=1), dict(block_size=8, mode="gs-jacobi", init="ngram", max_iters=3)]


def test_greedy_identical_to_plain_on_all_prompts(default_model):
    accepted = 0
    for i, prompt in enumerate(PROMPTS):
        ref = pd.generate(default_model, prompt, "plain", chat=True, max_new_tokens=24)
        out = pd.generate(default_model, prompt, "jacobi", CONFIGS[i % len(CONFIGS)], chat=True, max_new_tokens=24)
        assert out.token_ids == ref.token_ids, (prompt, CONFIGS[i % len(CONFIGS)])
        assert out.finish_reason == ref.finish_reason
        accepted += accepted_draft_tokens(out.stats)
    # 58 accepted guesses over the 22 prompts; guesses reset to padding every call get 5
    assert accepted > 20, accepted


@settings(max_examples=30, deadline=None)
@given(prompt=st.lists(st.integers(3, 96), min_size=1, max_size=24), block=st.integers(1, 8),
       mode=st.sampled_from(["jacobi", "gs-jacobi"]), init=st.sampled_from(["pad", "copy", "ngram"]),
       max_iters=st.integers(0, 3), max_new=st.integers(1, 24))
def test_greedy_identical_on_tiny_models(tiny, prompt, block, mode, init, max_iters, max_new):
    opts = dict(block_size=block, mode=mode, init=init, max_iters=max_iters)
    ref = pd.generate(tiny, prompt, "plain", max_new_tokens=max_new)
    out = pd.generate(tiny, prompt, "jacobi", opts, max_new_tokens=max_new)
    assert out.token_ids == ref.token_ids


def _random_prompt(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (8,), generator=g).tolist()


@pytest.mark.parametrize("init", ["pad", "copy", "ngram"])
@pytest.mark.parametrize("mode", ["jacobi", "gs-jacobi"])
def test_guesses_are_accepted_on_tiny_models(tiny, mode, init):
    """The companion of the property test above, where many examples accept nothing: fixed prompts on
    which every variant's iterates converge ahead of the committed token (6 to 44 accepted guesses over
    the 6 prompts; guesses reset to padding every call accept none)."""
    accepted = 0
    for seed in range(6):
        prompt = _random_prompt(seed)
        ref = pd.generate(tiny, prompt, "plain", max_new_tokens=24, ignore_eos=True)
        out = pd.generate(tiny, prompt, "jacobi", dict(block_size=4, mode=mode, init=init), max_new_tokens=24,
                          ignore_eos=True)
        assert out.token_ids == ref.token_ids
        accepted += accepted_draft_tokens(out.stats)
    assert accepted >= 3, accepted


class Recording:
    """Wraps a model (composition) and records the cache length before every call."""

    def __init__(self, model):
        self.model, self.lengths = model, []
        self.info, self.tokenizer = model.info, model.tokenizer

    max_context = property(lambda self: self.model.max_context)
    vocab_size = property(lambda self: self.model.vocab_size)

    def new_cache(self, *a, **kw):
        return self.model.new_cache(*a, **kw)

    def forward(self, cache, *a, **kw):
        self.lengths.append(cache.length)
        return self.model.forward(cache, *a, **kw)

    def forward_greedy(self, cache, *a, **kw):
        self.lengths.append(cache.length)
        return self.model.forward_greedy(cache, *a, **kw)


@pytest.mark.parametrize("mode", ["jacobi", "gs-jacobi"])
def test_cache_holds_only_committed_tokens_and_prefix_converges(tiny, mode):
    model = Recording(tiny)
    prompt = [5, 6, 7, 8, 5, 6, 7]
    out = pd.generate(model, prompt, "jacobi", dict(block_size=5, mode=mode), max_new_tokens=30,
                      ignore_eos=True, trace=True)
    calls = out.trace[1:]                                  # after the prefill record
    assert len(model.lengths) == 1 + len(calls)
    for length, rec in zip(model.lengths[1:], calls):
        # every committed token except the newest one (fed as t0) is cached, nothing else
        assert length == len(prompt) + rec["position"] - 1
        g, y, acc = rec["proposed"], rec["outputs"], rec["accepted"]
        k = len(acc) - 1                                   # accepted = the converged prefix of the new iterate
        assert acc == y[:k + 1] and g[:k] == y[:k] and (k == len(g) or g[k] != y[k])
    assert [t for r in out.trace for t in r["accepted"]][:30] == out.token_ids
    # the prompt's repeats make the n-gram guesses converge: 20 guesses accepted in both modes, whole
    # blocks at a time (guesses reset to padding every call accept none)
    assert accepted_draft_tokens(out.stats) >= 10 and max(len(rec["accepted"]) for rec in calls) > 1


def test_sampling_is_refused_with_a_pointer_to_lookahead(tiny):
    with pytest.raises(pd.UserError, match="lookahead"):
        pd.generate(tiny, [5, 6], "jacobi", temperature=0.7, max_new_tokens=4)


def test_bad_options_are_user_errors():
    with pytest.raises(pd.UserError, match="block_size"):
        pd.get_method("jacobi", {"block_size": "0"})
    with pytest.raises(pd.UserError, match="mode"):
        pd.get_method("jacobi", {"mode": "seidel"})
