"""The native backend against transformers, logit for logit.

Every lossless method is only as exact as the model calls it is built on, so
the native backend must reproduce transformers (float32, < 1e-4) on prompts,
on a block of new tokens after a cached prefix, and on token trees (custom
mask + positions). Each mask test also checks that the mask *matters*, so a
backend that ignored it would fail.
"""

from __future__ import annotations

import pytest
import torch

from paradecode.models.base import causal_mask
from paradecode.models.tiny import tiny_hf_model, tiny_native, tiny_pair

TOL = 1e-4

TINY_CONFIGS = {
    "llama": dict(arch="llama"),
    "qwen2": dict(arch="qwen2"),
    "mistral": dict(arch="mistral", kv_heads=1),
    "llama-rope-llama3": dict(arch="llama", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "llama-rope-linear": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama-tied": dict(arch="llama", tie=True, kv_heads=4),
}


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def pair(request):
    kw = dict(TINY_CONFIGS[request.param])
    return tiny_pair(kw.pop("arch"), seed=1, **kw)


@pytest.fixture(scope="module")
def default_pair(default_model):
    from paradecode import load_model

    return load_model(backend="transformers", dtype="float32"), default_model


def _ids(n: int, vocab: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, n), generator=g)


def tree_block():
    """A 6-node token tree after the prefix and its (T, T) mask and depths.

    Nodes 0 and 1 are siblings (depth 0); 2 is a child of 0, 3 of 1, 4 and 5
    children of 2. Each node sees its ancestors and itself.
    """
    parents = [-1, -1, 0, 1, 2, 2]
    T = len(parents)
    mask = torch.zeros(T, T, dtype=torch.bool)
    depth = [0] * T
    for i, p in enumerate(parents):
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
            depth[i] = depth[p] + 1
    return mask, torch.tensor(depth)


def _compare_model_pair(hf, nat, vocab: int, prefix: int = 11, chunk: int = 5) -> None:
    ids = _ids(prefix + chunk, vocab, seed=3)
    # 1. a whole prompt in one call
    a = hf.forward(hf.new_cache(1, 64), ids)
    b = nat.forward(nat.new_cache(1, 64), ids)
    assert (a - b).abs().max() < TOL
    # 2. a causal chunk after a cached prefix equals the same positions of the whole prompt
    ch, cn = hf.new_cache(1, 64), nat.new_cache(1, 64)
    hf.forward(ch, ids[:, :prefix])
    nat.forward(cn, ids[:, :prefix])
    a2 = hf.forward(ch, ids[:, prefix:])
    b2 = nat.forward(cn, ids[:, prefix:])
    assert (a2 - b2).abs().max() < TOL
    assert (b2 - b[:, prefix:]).abs().max() < TOL
    # 3. a token tree with its mask and positions
    mask, depth = tree_block()
    T = mask.shape[0]
    tree = _ids(T, vocab, seed=4)
    pos = (prefix + depth)[None]                                       # (1, T)
    ch.rollback(prefix)
    cn.rollback(prefix)
    a3 = hf.forward(ch, tree, pos, mask[None])
    b3 = nat.forward(cn, tree, pos, mask[None])
    assert (a3 - b3).abs().max() < TOL
    # the mask matters: the causal result differs on every non-root node ...
    cn.rollback(prefix)
    causal = nat.forward(cn, tree, pos)
    assert (causal[:, 2:] - b3[:, 2:]).abs().max() > 1e-3
    # ... and a tree node equals the plain chain of its ancestors (node 4 = path 0, 2, 4)
    path = [0, 2, 4]
    cn.rollback(prefix)
    chain = nat.forward(cn, tree[:, path])
    assert (chain - b3[:, path]).abs().max() < TOL


def test_tiny_native_matches_transformers(pair):
    hf, nat = pair
    _compare_model_pair(hf, nat, nat.vocab_size)


def test_default_native_matches_transformers(default_pair):
    hf, nat = default_pair
    _compare_model_pair(hf, nat, nat.vocab_size, prefix=20, chunk=8)


def test_default_chat_prompt_matches(default_pair):
    hf, nat = default_pair
    tok = nat.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                   add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    a = hf.forward(hf.new_cache(1, 128), ids)
    b = nat.forward(nat.new_cache(1, 128), ids)
    assert (a - b).abs().max() < TOL
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_logits_for_selects_positions(pair):
    _, nat = pair
    ids = _ids(9, nat.vocab_size)
    full = nat.forward(nat.new_cache(1, 32), ids)
    sel = torch.tensor([2, 8])
    part = nat.forward(nat.new_cache(1, 32), ids, logits_for=sel)
    assert part.shape == (1, 2, nat.vocab_size)
    assert (part - full[:, sel]).abs().max() < TOL


def test_layer_subset(tiny_llama_pair):
    """``layers=`` (self-speculation) runs only those layers; all layers = the full model."""
    _, nat = tiny_llama_pair
    ids = _ids(7, nat.vocab_size)
    full = nat.forward(nat.new_cache(1, 32), ids)
    same = nat.forward(nat.new_cache(1, 32), ids, layers=list(range(nat.info.num_layers)))
    assert torch.equal(full, same)
    skip = nat.forward(nat.new_cache(1, 32), ids, layers=[0])
    assert (skip - full).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_low_precision_close_to_float32(dtype):
    """Lower-precision formats track float32 (loosely: they are not exact)."""
    hf = tiny_hf_model("llama", seed=2)
    ref = tiny_native(hf)
    low = tiny_native(hf, dtype=dtype)
    ids = _ids(12, ref.vocab_size)
    a = ref.forward(ref.new_cache(1, 32), ids)
    b = low.forward(low.new_cache(1, 32), ids)
    assert b.dtype == torch.float32
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.05


def test_causal_mask_helper():
    m = causal_mask(3)
    assert m.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
