"""The ``quantspec`` method and the int4 weight format it drafts with.

The int4 packing is checked against a dequantized reference; decoding is
compared token for token with plain greedy (tiny models with hypothesis, the
default model over all PROMPTS); sampling must follow the exact target
distribution; the draft must leave the target's cache as it found it.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paradecode.api import generate
from paradecode.errors import UserError
from paradecode.models.quant import int4_codes, linear, quantize_int4
from paradecode.models.tiny import tiny_hf_model, tiny_model, tiny_native

from prompts import PROMPTS
from test_speculative import MUTATIONS, exactness_pvalue, method_run


@pytest.fixture(scope="module")
def tiny32():
    """A tiny random 3-layer model whose widths suit int4 (multiples of 32)."""
    return tiny_model("llama", seed=7, layers=3, hidden=64, intermediate=128)


def _prompt(n: int, seed: int = 0, vocab: int = 97) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


# -- the int4 format ---------------------------------------------------------------------------------
def _dequantize(q, scale, zero, group=32):
    return (q.float() - 8) * scale.float().repeat_interleave(group, 1) + zero.float().repeat_interleave(group, 1)


def test_int4_product_matches_dequantized_weights():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(97, 64, generator=g) * 0.05                              # 97 rows: padded to 112 inside
    q4 = quantize_int4(w)
    q, scale, zero = int4_codes(w)
    deq = _dequantize(q, scale, zero)
    assert bool(((deq - w).abs() <= scale.float().repeat_interleave(32, 1) * 0.5 + 1e-4).all())
    x = torch.randn(5, 64, generator=g).bfloat16()
    y = linear(x, q4)
    assert y.shape == (5, 97) and q4.shape == (97, 64)
    ref = x.float() @ deq.T
    assert (y.float() - ref).abs().max() < 0.02 * ref.abs().max()
    assert torch.equal(linear(x[2:3], q4), y[2:3])                            # rows are independent


def test_int4_recovers_q4_1_blocks():
    """Weights that are GGUF Q4_1 blocks (d * q + m, codes 0..15 used) get their own codes back."""
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (16, 64), generator=g)
    codes[:, 0], codes[:, 1], codes[:, 32], codes[:, 33] = 0, 15, 0, 15
    d = torch.rand(16, 2, generator=g) * 0.01 + 1e-3
    m = -torch.rand(16, 2, generator=g) * 0.05
    w = d.repeat_interleave(32, 1) * codes + m.repeat_interleave(32, 1)
    q, _, _ = int4_codes(w)
    assert torch.equal(q, codes.int())


def test_int4_refuses_unsuitable_widths():
    with pytest.raises(UserError, match="multiples of 32"):
        tiny_model("llama", seed=0, hidden=48, intermediate=96, heads=3, kv_heads=1, dtype="int4")


# -- greedy: identical to plain ---------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 20), seed=st.integers(0, 1000), k=st.integers(1, 8), budget=st.integers(1, 30),
       fmt=st.sampled_from(["int4", "int8"]), threshold=st.sampled_from([0.0, 0.3, 0.9]), siblings=st.integers(0, 3),
       vocab=st.sampled_from([0, 16, 48]), acts=st.sampled_from([8, 16]))
def test_greedy_matches_plain_tiny(tiny32, n, seed, k, budget, fmt, threshold, siblings, vocab, acts):
    p = _prompt(n, seed)
    ref = generate(tiny32, p, "plain", max_new_tokens=budget, ignore_eos=True)
    r = generate(tiny32, p, "quantspec", {"num_draft_tokens": k, "max_draft_tokens": max(k, 8),
                                          "draft_format": fmt, "confidence_threshold": threshold,
                                          "siblings": siblings, "draft_vocab": vocab,
                                          "draft_activations": acts if fmt == "int4" else 8},
                 max_new_tokens=budget, ignore_eos=True)
    assert r.token_ids == ref.token_ids
    assert r.stats.extra["draft_format"] == fmt


def test_draft_is_mostly_accepted_and_cache_is_restored(tiny32):
    """The int4 twin is close to the target: most drafts pass. A draft that left its own keys/values
    behind (no roll-back) would shift every later verification and break the identity above."""
    p = _prompt(10, 3)
    ref = generate(tiny32, p, "plain", max_new_tokens=40, ignore_eos=True)
    r = generate(tiny32, p, "quantspec", {"backoff": False, "confidence_threshold": 0.0}, max_new_tokens=40,
                 ignore_eos=True)
    assert r.token_ids == ref.token_ids
    assert r.stats.draft_tokens > 0 and r.stats.tokens_per_call > 2
    assert r.stats.extra["drafter_memory_bytes"] > 0


def test_prompt_lookup_drafts_first(tiny32):
    """A context that repeats itself is drafted by lookup (free); lookup_ngram=0 leaves it to the twin."""
    p = _prompt(12, 5) * 3
    ref = generate(tiny32, p, "plain", max_new_tokens=30, ignore_eos=True)
    on = generate(tiny32, p, "quantspec", {"backoff": False}, max_new_tokens=30, ignore_eos=True)
    off = generate(tiny32, p, "quantspec", {"backoff": False, "lookup_ngram": 0}, max_new_tokens=30,
                   ignore_eos=True)
    assert on.token_ids == ref.token_ids == off.token_ids
    assert on.stats.extra["lookup_drafts"] > 0 and off.stats.extra["lookup_drafts"] == 0


def test_lookup_length_doubles_while_copies_are_accepted_whole():
    from paradecode.decoding.tree import Draft
    from paradecode.decoding.verify import Verdict
    from paradecode.methods.quantspec import QuantSpecConfig, TwinDrafter

    d = TwinDrafter(QuantSpecConfig(lookup_tokens=4, max_lookup_tokens=12), twin=None)
    assert d.max_nodes >= 12

    def copied(n_drafted: int, n_accepted: int) -> None:
        d.looked_up = True
        draft = Draft.chain(list(range(3, 3 + n_drafted)))
        d.observe([], Verdict(list(range(n_accepted)), draft.tokens[:n_accepted] + [1], draft=draft), None)

    copied(4, 4)
    assert d.lookup_len == 8
    copied(8, 8)
    assert d.lookup_len == 12                          # capped
    copied(5, 5)                                       # the match ran out early: no change
    assert d.lookup_len == 12
    copied(12, 3)                                      # broke off: back to the base length
    assert d.lookup_len == 4
    with pytest.raises(UserError, match="max_lookup_tokens"):
        QuantSpecConfig(lookup_tokens=10, max_lookup_tokens=8).validate()


def _every_bigram_then(last: int, symbols=(0, 1, 2, 3, 4, 5, 7)) -> list[int]:
    """Every bigram of ``symbols``, then ``last`` (its only occurrence): the context's own tail never matches
    a lookup, while almost any token drafted after it ends on a bigram seen before."""
    return [x for a in symbols for b in symbols for x in (a, b)] + [last]


def test_twin_stops_where_its_draft_ends_on_an_input_ngram():
    """free_tail: once the twin's tokens end on an n-gram of the context, what followed it there continues
    the draft; the twin's draft length k learns from the twin's own tokens only."""
    from paradecode.decoding.tree import Draft
    from paradecode.decoding.verify import Verdict
    from paradecode.methods.quantspec import QuantSpecConfig, TwinDrafter
    from paradecode.stats import DecodeStats

    d = TwinDrafter(QuantSpecConfig(lookup_tokens=3, num_draft_tokens=2), twin=None)
    d.stats = DecodeStats()
    d.stats.extra.update(lookup_extensions=0)
    context = [1, 7, 8, 9, 10, 11, 12, 2, 3]
    assert d.free_tail(context, [5], 16) == []                      # (3, 5) never occurred
    assert d.free_tail(context, [5, 7, 8], 16) == [9, 10, 11]         # (7, 8) did: 9 10 11 followed
    assert d.free_tail(context, [5, 7, 8], 2) == [9, 10]              # no more than the room left
    assert d.stats.extra["lookup_extensions"] == 2
    d.last_drafted, d.looked_up = 2, False                         # the twin drafted 7 8, the tail 9 10 11
    draft = Draft.chain([7, 8]).then(Draft.chain([9, 10, 11]))
    d.observe(context, Verdict([0, 1], [7, 8, 5], draft=draft), None)   # twin tokens accepted, tail not
    assert d.k == 4                                                 # grew as for a whole accepted twin draft
    assert TwinDrafter(QuantSpecConfig(lookup_after_draft=False), twin=None).free_tail(context, [7, 8], 16) == []


def test_lookup_tails_keep_greedy_identity():
    t = tiny_model("llama", seed=7, layers=3, vocab_size=8, hidden=64, intermediate=128)
    p = _every_bigram_then(6)
    ref = generate(t, p, "plain", max_new_tokens=30, ignore_eos=True)
    r = generate(t, p, "quantspec", {"backoff": False}, max_new_tokens=30, ignore_eos=True)
    assert r.token_ids == ref.token_ids
    assert r.stats.extra["lookup_extensions"] > 0


def test_a16_twin_takes_the_a16_kernel_and_rechecks_its_best_logits(tiny32):
    """draft_activations=16: the twin's layer matrices are the A16 variant's (float16 scales), and each row's
    best logits (every one within REFINE_MARGIN of its max, up to REFINE_TOP) are float32 sums over the head's
    own values, not the int8 head's; the others stay the int8 head's."""
    from paradecode.models.native import REFINE_MARGIN, REFINE_TOP
    from paradecode.models.quant import Int4W4A16Weight

    a8, a16 = tiny32.twin("int4"), tiny32.twin("int4", int4_activations=16)
    assert a8 is not a16 and tiny32.twin("int4", int4_activations=16) is a16       # built once
    assert not isinstance(a8.wqkv[0], Int4W4A16Weight) and a8.refine_top == 0
    assert all(isinstance(w, Int4W4A16Weight) for w in a16.wqkv + a16.wo + a16.wgu + a16.wdown)
    assert a16.refine_top == REFINE_TOP
    ids = torch.tensor([_prompt(9, 2)])
    seen = {}
    refine = a16._refine

    def spy(h, logits):
        seen["h"], seen["raw"] = h.clone(), logits.clone()
        return refine(h, logits)

    a16._refine = spy
    try:
        logits = a16.forward(a16.new_cache(1, 16), ids)[0]                      # (9, V)
    finally:
        del a16._refine
    raw, h = seen["raw"], seen["h"][:9].float()
    near = raw >= raw.amax(-1, keepdim=True) - REFINE_MARGIN
    k = min(int(near.sum(-1).max()), REFINE_TOP)
    assert k > 1                                                                 # (near-ties to recheck here)
    top = raw.topk(k, dim=-1).indices                                            # (9, k): near ones first
    missed = near.scatter(-1, top, False)                                        # near ones left out
    assert not missed[near.sum(-1) <= REFINE_TOP].any()                          # none, unless more than k
    # an untied head's values: the target's head (a tied one's: the twin's bfloat16 embedding)
    assert not tiny32.shape.tie_embeddings and a16.refine_head is tiny32.lm_head
    want = torch.einsum("rh,rkh->rk", h, tiny32.lm_head.rows(top).float())
    torch.testing.assert_close(logits.gather(-1, top), want, rtol=1e-6, atol=1e-6)
    rest = torch.ones_like(logits, dtype=torch.bool).scatter(-1, top, False)
    assert torch.equal(logits[rest], raw[rest])                                  # the others: the int8 head's
    assert not torch.equal(want, raw.gather(-1, top))


def test_bad_options():
    from paradecode.methods.base import get_method

    assert get_method("quantspec", {"draft_activations": "8"}).config.draft_activations == 8    # the CLI's text
    with pytest.raises(UserError, match="draft_activations"):
        get_method("quantspec", {"draft_activations": 12})

    with pytest.raises(UserError, match="lookup_ngram"):
        get_method("quantspec", {"lookup_ngram": 5})
    with pytest.raises(UserError, match="draft_format"):
        get_method("quantspec", {"draft_format": "int2"})


# -- the draft vocabulary -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_draft_vocab_scores_its_tokens_as_the_whole_head_does(tiny32, fmt):
    """The twin's logits over a draft vocabulary: the whole head's on its tokens (the first 32 ids, then the
    ones added), -inf on every other token."""
    from paradecode.drafters.vocab import DraftVocab

    twin = tiny32.twin(fmt)
    ids = torch.tensor([_prompt(7, 1)])
    full = twin.forward(twin.new_cache(1, 16), ids)[0]                          # (7, V)
    vocab = DraftVocab.build(twin, 40)                                           # rounded down to 32
    assert vocab.size == 32 and len(vocab) == 32
    vocab.add([5, 60, 90, 60])                                                   # 5 is in already
    assert len(vocab) == 34 and 90 in vocab and 33 not in vocab
    part = twin.forward(twin.new_cache(1, 16), ids, vocab=vocab)[0]
    inside = torch.zeros(twin.vocab_size, dtype=torch.bool)
    inside[:32] = inside[60] = inside[90] = True
    torch.testing.assert_close(part[:, :32], full[:, :32], rtol=0, atol=0)      # the head's own product
    # the added ids: float32 rows of the same weights (the int8 kernel rounds its inputs to 15 bits)
    torch.testing.assert_close(part[:, inside], full[:, inside], rtol=1e-3, atol=1e-3)
    assert torch.isneginf(part[:, ~inside]).all()
    assert DraftVocab.build(twin, 0) is None and DraftVocab.build(twin, 112) is None        # 112 > 97 ids


def test_first_channels_is_the_first_rows_of_every_layout():
    from paradecode.models.quant import (can_pack_bf16, first_channels, pack_bf16, pack_f32, pack_int8_i15,
                                         pack_int8_panels, quantize_int8)

    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    layouts = [w, quantize_int8(w), pack_f32(w), pack_int8_panels(quantize_int8(w), float_out=True),
               pack_int8_i15(quantize_int8(w), float_out=True)]
    for lay in layouts:
        xin = x.bfloat16() if type(lay).__name__ == "Int8Weight" else x
        torch.testing.assert_close(linear(xin, first_channels(lay, 32)), linear(xin, lay)[:, :32])
    with pytest.raises(ValueError, match="multiple of 16"):
        first_channels(w, 20)
    if can_pack_bf16():
        assert first_channels(pack_bf16(w.bfloat16()), 32) is None            # oneDNN's layout has no such view


# -- sampling: exact distribution ---------------------------------------------------------------------
@functools.cache
def _rough_twin_model(vocab_size: int):
    """A tiny 2-layer model whose int4 twin is a rough draft: each layer weight is scaled by a log-normal factor
    exp(2 N(0, 1)), so a few large weights set each group's int4 step and the others round coarsely. At
    SAMPLING_GEN its twin's distribution overlaps the target's ~60% (a plain tiny model's: ~90%, too few
    rejections for a wrong residual to show)."""
    hf = tiny_hf_model("llama", seed=5, layers=2, vocab_size=vocab_size, hidden=64, intermediate=128)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, w in hf.named_parameters():
            if name.endswith("proj.weight"):
                w.mul_(torch.randn(w.shape, generator=g).mul(2.0).exp())
    return tiny_native(hf)


SAMPLING_GEN = dict(max_new_tokens=4, temperature=0.5, top_k=4, ignore_eos=True)
SAMPLING_OPTIONS = {"confidence_threshold": 0.0, "schedule": "constant", "num_draft_tokens": 2, "backoff": False}
SAMPLING_CASES = {   # name: (vocabulary, prompt, options, runs, a stats.extra count that must be > 0)
    "chain": (8, [3, 7, 4], {}, 1000, None),
    "siblings": (8, [3, 7, 4], {"siblings": 2, "lookup_ngram": 0}, 1000, "sibling_hits"),
    # the twin scores only ids 0-15 (and the prompt's): its q is zero on most of the target's top 4, so most
    # target tokens come from the residual
    "draft_vocab": (48, [3, 7, 4], {"lookup_ngram": 0, "draft_vocab": 16}, 600, None),
    # the first call finds no lookup for its context (…, 6, t1), the twin drafts, and its token almost always
    # ends on a bigram of the prompt: a lookup tail follows (one-hot q rows below the twin's q row)
    "lookup_tail": (8, _every_bigram_then(6), {"num_draft_tokens": 1, "lookup_ngram": 2}, 2400, "lookup_extensions"),
}


def _sampling_pvalue(case: str) -> float:
    vocab, prompt, options, runs, seen = SAMPLING_CASES[case]
    model = _rough_twin_model(vocab)
    make = method_run(model, prompt, "quantspec", SAMPLING_OPTIONS | options, SAMPLING_GEN)
    if seen:
        assert sum(make(seed)[1].extra.get(seen, 0) for seed in range(20)) > 0
    return exactness_pvalue(model, prompt, make, runs, SAMPLING_GEN)


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_sampling_is_exact(case):
    assert _sampling_pvalue(case) > 1e-4


@pytest.mark.parametrize("case, mutation", [(case, "A-no-residual") for case in SAMPLING_CASES] +
                         [("chain", "B-accept-1.5x"), ("chain", "C-q-untempered")])
def test_sampling_negative_control(case, mutation, monkeypatch):
    """The test above, with a wrong acceptance rule or a wrong q, must fail."""
    MUTATIONS[mutation](monkeypatch)
    assert _sampling_pvalue(case) < 1e-6


# -- refusals -----------------------------------------------------------------------------------------
def test_refusals(tiny_llama_pair):
    hf, _ = tiny_llama_pair
    with pytest.raises(UserError, match="--backend native"):
        generate(hf, _prompt(5), "quantspec", max_new_tokens=5)
    q = tiny_model("llama", seed=0, dtype="int4")
    with pytest.raises(UserError, match="already runs in int4"):
        generate(q, _prompt(5), "quantspec", max_new_tokens=5)


# -- the default model ----------------------------------------------------------------------------------
def test_default_model_matches_plain_on_all_prompts(default_model):
    """Greedy token identity with plain on every prompt (the W4A8 int4 twin, the A16 one, the int8 one); the
    int4 twin drafts well on this model (it holds the GGUF file's own 4-bit codes), so most drafted tokens are
    accepted. The model's head is tied: the A16 twin rechecks its best logits with its bfloat16 embedding."""
    mismatches, accepted, drafted = [], 0, 0
    for i, prompt in enumerate(PROMPTS):
        options = {"draft_format": "int8"} if i % 7 == 3 else {"draft_activations": 16} if i % 7 == 5 else \
            {"num_draft_tokens": 1 + i % 8, "siblings": i % 3}
        ref = generate(default_model, prompt, "plain", chat=True, max_new_tokens=24)
        r = generate(default_model, prompt, "quantspec", options, chat=True, max_new_tokens=24)
        if r.token_ids != ref.token_ids:
            mismatches.append(prompt[:40])
        accepted += sum(a - 1 for a in r.stats.accepted_lengths)
        drafted += r.stats.draft_tokens
    assert not mismatches
    twin = default_model.twin("int4", int4_activations=16)
    assert twin.refine_head is twin.embed and twin.embed.dtype == torch.bfloat16
    # (> 0.5 with the whole vocabulary; a draft vocabulary renormalises the twin's confidence, so it drafts
    # longer chains and fewer of their tokens pass)
    assert drafted > 0 and accepted / drafted > 0.4
