"""pld, ngram and recycle: their pure lookups on tiny lists, their configs, and greedy
output identical to plain decoding (tiny random models with generated configs; the
default model over all PROMPTS)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import paradecode as pd
from paradecode.errors import UserError
from paradecode.methods import get_method
from paradecode.methods.ngram import NgramModule, ngram_tree
from paradecode.methods.pld import prompt_lookup
from paradecode.methods.recycle import RecyclingDrafter, expand_template, tree_template
from paradecode.decoding.tree import node_depths
from paradecode.decoding.verify import Verdict
from paradecode.decoding.tree import Draft
from prompts import PROMPTS
from test_speculative import accepted_draft_tokens

METHODS = ["pld", "ngram", "recycle"]


# -- pld ------------------------------------------------------------------------------------------
def _lookup_brute(tokens, max_ngram, min_ngram, k):
    for n in range(max_ngram, min_ngram - 1, -1):
        if n >= len(tokens):
            continue
        starts = [i for i in range(len(tokens) - n) if tokens[i:i + n] == tokens[-n:]]
        if starts:
            i = max(starts)
            return tokens[i + n:i + n + k]
    return []


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=30), st.integers(1, 4), st.integers(1, 3), st.integers(1, 6))
def test_prompt_lookup_matches_brute_force(tokens, max_ngram, min_ngram, k):
    max_ngram = max(max_ngram, min_ngram)
    assert prompt_lookup(tokens, max_ngram, min_ngram, k) == _lookup_brute(tokens, max_ngram, min_ngram, k)


def test_prompt_lookup_examples():
    assert prompt_lookup([1, 2, 3, 4, 1, 2], 2, 1, 2) == [3, 4]
    assert prompt_lookup([1, 2, 3, 4, 5, 2], 3, 2, 2) == []          # only a 1-gram matches, min is 2
    assert prompt_lookup([7, 7, 7], 2, 1, 5) == [7]                  # overlapping match, short tail
    assert prompt_lookup([], 3, 1, 4) == [] and prompt_lookup([5], 3, 1, 4) == []


# -- ngram ----------------------------------------------------------------------------------------
def test_ngram_module_prefers_longest_order_and_counts():
    m = NgramModule(1, 3)
    m.update([1, 2, 3, 1, 2, 4, 5, 2, 4, 9, 2, 3])
    assert m.predict([1, 2], 1) == [4]        # (1, 2) -> 3 once, -> 4 once: the more recent (4) wins
    assert m.predict([9, 2], 2) == [3, 4]     # (9, 2) -> 3, then order 1: (2,) -> 4 (twice) ...
    assert m.predict([5, 2], 3) == [4, 3]     # (5, 2) -> 4, then (2,) -> 3
    m.update([1, 2, 3, 1, 2, 4, 5, 2, 4, 9, 2, 3, 1, 2, 4])   # incremental: only new positions
    assert m.table[(1, 2)] == {3: [1, 2], 4: [2, 14]}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.integers(1, 4), st.integers(1, 6))
def test_ngram_tree_is_a_set_of_chains(tokens, branches, depth):
    m = NgramModule(1, 3)
    m.update(tokens)
    d = ngram_tree(m, tokens, branches, depth)
    roots = d.children(-1)
    assert len(roots) <= branches and len({d.tokens[r] for r in roots}) == len(roots)
    assert d.depth <= depth
    assert all(len(d.children(i)) <= 1 for i in range(len(d)))
    if roots:                                  # the first branch starts with the top prediction
        assert d.tokens[roots[0]] == m.predict(tokens, 1)[0]


# -- recycle --------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 8), st.integers(1, 6))
def test_tree_template_is_topological_and_prefix_closed(n, k, depth):
    t = tree_template(n, k, depth)
    parents = [p for p, _ in t]
    assert len(t) == min(n, sum(k ** d for d in range(1, depth + 1)))
    assert all(-1 <= p < i for i, p in enumerate(parents))
    assert max(node_depths(parents)) <= depth
    assert len({(p, r) for p, r in t}) == len(t) and all(0 <= r < k for _, r in t)
    assert tree_template(n // 2, k, depth) == t[:n // 2]


def test_expand_template_and_refresh():
    succ = torch.full((10, 2), -1, dtype=torch.int32)
    succ[1] = torch.tensor([2, 3], dtype=torch.int32)
    succ[2] = torch.tensor([4, -1], dtype=torch.int32)
    template = [(-1, 0), (0, 0), (-1, 1), (0, 1), (1, 0)]
    d = expand_template(succ, 1, template, 10)
    # root 1 -> 2 -> 4 ; root -> 3 ; (2's rank 1 unknown) ; 4 has no successors
    assert d.tokens == [2, 4, 3] and d.parents == [-1, 0, -1]
    assert expand_template(succ, 1, template, 2).tokens == [2, 4]

    drafter = RecyclingDrafter(topk=2, tree_nodes=5, max_depth=3)

    class M:
        vocab_size = 10
    drafter.begin(M(), [1, 5, 1, 6, 1], pd.GenerationConfig(), None)
    assert drafter.successors[1].tolist() == [6, 5] and drafter.memory_bytes() == 10 * 2 * 4
    draft = Draft([6, 7], [-1, 0])
    logits = torch.zeros(3, 10)
    logits[0, [8, 9]] = torch.tensor([2.0, 1.0])   # after the root (1): 8 then 9
    logits[2, [3, 4]] = torch.tensor([1.0, 2.0])   # after node 1 (7): 4 then 3
    drafter.observe([0, 1, 6, 7, 9], Verdict([0, 1], [6, 7, 9], draft=draft), logits)
    assert drafter.successors[1].tolist() == [8, 9] and drafter.successors[7].tolist() == [4, 3]


# -- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,options,field", [
    ("pld", {"min_ngram": 0}, "min_ngram"), ("pld", {"max_ngram": 1, "min_ngram": 2}, "max_ngram"),
    ("pld", {"num_draft_tokens": "0"}, "num_draft_tokens"), ("ngram", {"depth": 0}, "depth"),
    ("ngram", {"num_branches": 99}, "num_branches"), ("recycle", {"topk": 0}, "topk"),
    ("recycle", {"tree_nodes": "many"}, "tree_nodes"), ("pld", {"nope": 1}, "nope"),
])
def test_invalid_options_name_the_field(name, options, field):
    with pytest.raises(UserError) as e:
        get_method(name, options)
    assert e.value.field == field


def test_options_from_strings():
    m = get_method("pld", {"max_ngram": "4", "backoff": "false"})
    assert m.config.max_ngram == 4 and m.config.backoff is False
    assert all(get_method(n).lossless for n in METHODS)


# -- greedy equality on tiny models ---------------------------------------------------------------
# The back-off is off: it decides from measured wall time, so with it on whether anything is drafted
# would depend on the machine's load.
CONFIGS = {
    "pld": st.fixed_dictionaries({"max_ngram": st.integers(1, 4), "min_ngram": st.just(1),
                                  "num_draft_tokens": st.integers(1, 12), "backoff": st.just(False)}),
    "ngram": st.fixed_dictionaries({"max_order": st.integers(1, 5), "min_order": st.just(1),
                                    "num_branches": st.integers(1, 4), "depth": st.integers(1, 8),
                                    "backoff": st.just(False)}),
    "recycle": st.fixed_dictionaries({"topk": st.integers(1, 8), "tree_nodes": st.integers(1, 30),
                                      "max_depth": st.integers(1, 8), "backoff": st.just(False)}),
}


@pytest.mark.parametrize("name", METHODS)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_greedy_equals_plain_on_tiny(tiny, name, data):
    options = data.draw(CONFIGS[name])
    unit = data.draw(st.lists(st.integers(3, 96), min_size=1, max_size=6))
    prompt = (unit * data.draw(st.integers(1, 4)))[:20]              # repetitive prompts give matches
    n = data.draw(st.integers(1, 30))
    want = pd.generate(tiny, prompt, "plain", max_new_tokens=n, ignore_eos=True)
    got = pd.generate(tiny, prompt, name, options, max_new_tokens=n, ignore_eos=True)
    assert got.token_ids == want.token_ids


def _repetitive_prompt(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    unit = torch.randint(3, 97, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
    return (unit * 4)[:16]


@pytest.mark.parametrize("name", METHODS)
def test_drafts_are_accepted_on_tiny(tiny, name):
    """The companion of the property test above, some of whose examples draft nothing: on 6 repetitive
    prompts every method's drafts are accepted (pld 48, ngram 69, recycle 81 draft tokens; a method that
    drafts nothing, i.e. plain decoding, 0)."""
    accepted = 0
    for seed in range(6):
        prompt = _repetitive_prompt(seed)
        want = pd.generate(tiny, prompt, "plain", max_new_tokens=24, ignore_eos=True)
        got = pd.generate(tiny, prompt, name, {"backoff": False}, max_new_tokens=24, ignore_eos=True)
        assert got.token_ids == want.token_ids
        accepted += accepted_draft_tokens(got.stats)
    assert accepted > 20, accepted


# -- greedy equality on the default model ---------------------------------------------------------
MAX_NEW = 16   # 22 prompts x (plain + 3 methods) must fit the suite budget on 2 shared cores
_plain_cache: dict[int, list[int]] = {}


def _plain(model, i):
    if i not in _plain_cache:
        _plain_cache[i] = pd.generate(model, PROMPTS[i], "plain", chat=True, max_new_tokens=MAX_NEW).token_ids
    return _plain_cache[i]


@pytest.mark.parametrize("name", METHODS)
def test_greedy_identical_to_plain_on_default_model(default_model, name):
    """Back-off off (it decides from wall time): 78 (pld), 78 (ngram) and 89 (recycle) draft tokens
    accepted over the 22 prompts; a method that drafts nothing would pass the rest of this test."""
    accepted = 0
    for i, prompt in enumerate(PROMPTS):
        want = _plain(default_model, i)
        got = pd.generate(default_model, prompt, name, {"backoff": False}, chat=True, max_new_tokens=MAX_NEW)
        assert got.token_ids == want, f"{name} differs from plain on prompt {i}"
        assert got.stats.model_calls <= len(want) + 1
        accepted += accepted_draft_tokens(got.stats)
    assert accepted > 30, accepted
