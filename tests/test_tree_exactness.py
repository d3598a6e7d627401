"""Tree-verifying methods stay exact in bfloat16, where last-bit attention differences become flipped ties.

A tree node off the first path sees its ancestors at other cache slots than plain decoding does, so its
logits are only close to plain decoding's; bfloat16 rounding turned that into different output for
`lookahead` on two benchmark prompts (multi_turn-02 at token 35, qa-02 at 39) before the verifier stopped
using such nodes' logits (``decoding/verify.py``). Chain methods are checked here too, on the same bfloat16
target, whose projections run oneDNN's prepacked kernels (``models/quant.py``).
"""

from __future__ import annotations

import pytest
import torch

import paradecode as pd
from paradecode.bench.prompts import load_suite

TREE_METHODS = [("lookahead", {}), ("lookahead", dict(window=4, ngram=4, guesses=3)),
                ("ngram", dict(num_branches=3)), ("recycle", {})]


@pytest.fixture(scope="module")
def bf16_model():
    return pd.load_model(dtype="bfloat16")


@pytest.fixture(scope="module")
def bench_prompts(bf16_model):
    wanted = {"multi_turn-02", "qa-02", "summarization-01"}
    prompts = [p for c in ("multi_turn", "qa", "summarization") for p in load_suite(c) if p.id in wanted]
    assert len(prompts) == len(wanted)
    return [(p.id, p.encode(bf16_model)) for p in prompts]


@pytest.mark.parametrize("method, options", TREE_METHODS)
def test_tree_methods_are_greedy_exact_in_bfloat16(bf16_model, bench_prompts, method, options):
    multi = 0
    for pid, ids in bench_prompts:
        ref = pd.generate(bf16_model, ids, "plain", max_new_tokens=48)
        out = pd.generate(bf16_model, ids, method, options, max_new_tokens=48)
        assert out.token_ids == ref.token_ids, (pid, method, options)
        multi += sum(n > 1 for n in out.stats.accepted_lengths)
    assert multi > 0                      # the trees did get tokens accepted


@pytest.mark.parametrize("method, options", [("quantspec", {}), ("pld", {})])
def test_chain_methods_are_greedy_exact_on_the_bfloat16_target(bf16_model, bench_prompts, method, options):
    """The bfloat16 target runs the compiled bfloat16 kernel (AMX tiles, else AVX-512 BF16 or AVX2; oneDNN's
    prepacked GEMMs where the kernels are not built) and prefills whole: drafted chains must still reproduce its
    plain greedy output token for token."""
    from paradecode.models.quant import BF16PanelWeight, PackedBF16Weight, can_pack_bf16

    kind = BF16PanelWeight if bf16_model.bf16_panels else PackedBF16Weight if can_pack_bf16() else torch.Tensor
    assert isinstance(bf16_model.wqkv[0], kind)
    multi = 0
    for pid, ids in bench_prompts:
        ref = pd.generate(bf16_model, ids, "plain", max_new_tokens=48)
        out = pd.generate(bf16_model, ids, method, options, max_new_tokens=48)
        assert out.token_ids == ref.token_ids, (pid, method)
        multi += sum(n > 1 for n in out.stats.accepted_lengths)
    assert multi > 0
