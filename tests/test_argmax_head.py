"""Greedy decoding's LM head (``models/argmax_head.py``): an int8 copy of the head and an error bound pick the
few tokens that can be a row's argmax, whose exact logits then decide. Its argmax must be the full head's,
bit for bit and ties included, on random inputs, on inputs aimed at near ties between rows the int8 copy
cannot tell apart, and over whole greedy decodes of the default model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from paradecode import generate, load_model
from paradecode.models import kernels
from paradecode.models.quant import linear
from paradecode.models.tiny import tiny_hf_model, tiny_native
from paradecode.sampling import argmax
from prompts import PROMPTS

pytestmark = pytest.mark.skipif(
    kernels.attention_kernel() is None,
    reason="the argmax head exists only for the compiled kernels' LM heads, and no C compiler built them here")


def _model(fmt: str):
    """A tiny model whose LM head has exact ties and near ties in other 16-channel panels: rows 200 and 7
    equal (the lower id must win), and rows 150 + i row i with every weight nudged by 2^-7 of itself (the int8
    copy has them alike)."""
    hf = tiny_hf_model("llama", seed=3, vocab_size=300, hidden=64, layers=1)
    with torch.no_grad():
        w = hf.lm_head.weight
        w[200] = w[7]
        for i in range(20, 40):
            sign = torch.sign(torch.randn(64, generator=torch.Generator().manual_seed(i)))
            w[150 + i] = w[i] * (1 + 2.0 ** -7 * sign)
    return tiny_native(hf, dtype=fmt, **({"bf16_kernel": True} if fmt == "bfloat16" else {}))


def _inputs(m, n: int = 300) -> torch.Tensor:
    """Final-norm outputs: random ones, and ones along a row of the head (that row and its twin on top)."""
    g = torch.Generator().manual_seed(1)
    rows = m.lm_head.rows(torch.tensor([7, 200] + list(range(20, 40)) + list(range(170, 190)))).float()
    aimed = rows[torch.randint(len(rows), (n,), generator=g)] * 40 + torch.randn(n, 64, generator=g) * 0.05
    return torch.cat([torch.randn(n, 64, generator=g) * 3, aimed]).to(m.dtype)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
def test_argmax_is_the_full_heads_and_the_logits_it_keeps_are_exact(fmt):
    m = _model(fmt)
    assert m.argmax_head is not None
    hs = _inputs(m)
    full = linear(hs, m.lm_head)[:, :m.vocab_size].float()
    narrowed = 0
    for h, f in zip(hs, full):
        got = m.argmax_head.logits(h[None], m.lm_head)[0]
        assert int(argmax(got)) == int(argmax(f))
        keep = torch.isfinite(got)
        assert torch.equal(got[keep], f[keep])                 # exact where kept, -inf elsewhere
        narrowed += int(keep.sum()) < m.vocab_size
    assert narrowed > len(hs) // 2                             # the bound does narrow the head down
    tie = m.lm_head.rows(torch.tensor([7])).float() * 40
    assert int(argmax(m.argmax_head.logits(tie.to(m.dtype), m.lm_head)[0])) == 7    # ties: the lower id


def test_a_bound_too_tight_picks_wrong_tokens():
    """The inputs above can catch a bound that is too tight: without it the int8 copy's argmax alone is
    wrong for some of them."""
    m = _model("float32")
    hs = _inputs(m)
    full = argmax(linear(hs, m.lm_head)[:, :m.vocab_size].float())
    tight = dataclasses.replace(m.argmax_head, coef=torch.zeros_like(m.argmax_head.coef))
    got = torch.stack([argmax(tight.logits(h[None], m.lm_head)[0]) for h in hs])
    assert (got != full).any()


def test_rows_it_cannot_narrow_get_the_full_head():
    m = _model("float32")
    h = torch.full((1, 64), float("nan"))
    assert torch.isnan(m.argmax_head.logits(h, m.lm_head)).all()           # the full head's NaNs, no -inf
    assert torch.equal(m.argmax_head.logits(torch.zeros(1, 64), m.lm_head),
                       linear(torch.zeros(1, 64), m.lm_head)[:, :m.vocab_size].float())


def test_only_single_rows_and_panel_heads_use_it():
    m = _model("bfloat16")
    c = m.new_cache(1, 32)
    ids = torch.randint(0, m.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    m.forward(c, ids[:, :6])
    two = m.forward_greedy(c, ids[:, 6:8])
    assert torch.isfinite(two).all()                           # 2 rows: the full head (bfloat16: 1 row)
    one = m.forward_greedy(c, ids[:, 8:9])
    assert not torch.isfinite(one).all()
    assert tiny_native(tiny_hf_model("llama", seed=3), dtype="int8").argmax_head is None


@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
def test_greedy_decodes_of_the_default_model_are_unchanged(default_model, fmt):
    """Plain greedy decoding with the argmax head against the same decode with the full head, 20 varied prompts."""
    m = default_model if fmt == "float32" else load_model(dtype=fmt)
    assert m.argmax_head is not None
    head = m.argmax_head
    for prompt in PROMPTS[:20]:
        fast = generate(m, prompt, chat=True, max_new_tokens=24)
        m.argmax_head = None
        try:
            slow = generate(m, prompt, chat=True, max_new_tokens=24)
        finally:
            m.argmax_head = head
        assert fast.token_ids == slow.token_ids, prompt


@pytest.mark.parametrize("method,greedy,calls", [
    ("plain", True, "all"), ("pld", True, "all"), ("plain", False, "none"), ("pld", False, "none"),
    ("recycle", True, "prefill"),
])
def test_only_callers_that_read_nothing_but_the_argmax_get_narrowed_logits(monkeypatch, method, greedy, calls):
    """Sampling reads whole distributions and Token Recycling its verification calls' top-k candidates:
    neither may get the -inf rows of ``forward_greedy`` there (recycle's prefill only yields the first
    token); plain greedy decoding and greedy prompt lookup get them in every call."""
    m = _model("float32")
    narrowed = []                  # per model call: whether it asked for greedy logits
    real = m.forward
    monkeypatch.setattr(m, "forward", lambda *a, **k: narrowed.append(k.get("greedy", False)) or real(*a, **k))
    settings = {} if greedy else dict(temperature=0.8, seed=3)
    generate(m, [5, 6, 7, 8, 5, 6, 7], method, max_new_tokens=12, ignore_eos=True, **settings)
    assert len(narrowed) > 2
    assert narrowed == {"all": [True] * len(narrowed), "none": [False] * len(narrowed),
                        "prefill": [True] + [False] * (len(narrowed) - 1)}[calls]
