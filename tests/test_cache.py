"""KV-cache semantics: rollback, compact and left-padded batches.

Verification rejects draft tokens (``rollback``) and keeps one root-to-leaf
path of a tree (``compact``); both must leave the cache exactly as if only
the accepted tokens had ever been fed. Batched prompts use left padding
(``input_valid``) and must give each row the logits it would get alone.
Checked on both backends.
"""

from __future__ import annotations

import pytest
import torch

from paradecode.models.tiny import tiny_model, tiny_pair

TOL = 1e-4


@pytest.fixture(scope="module", params=["native", "transformers", "native-qwen2", "native-int8", "native-torch"])
def model(request):
    """native: the compiled kernels' float32 cache with blocked keys; native-int8: their bfloat16 cache;
    native-torch: PyTorch's attention path, keys transposed."""
    if request.param == "native-qwen2":
        return tiny_pair("qwen2", seed=5)[1]
    if request.param in ("native-int8", "native-torch"):
        m = tiny_model(seed=5, dtype="int8" if request.param == "native-int8" else "float32",
                       attention="kernel" if request.param == "native-int8" else "torch")
        c = m.new_cache(1, 32)
        assert (c.k.dtype, c.blocked) == ((torch.bfloat16, True) if request.param == "native-int8" else
                                          (torch.float32, False))
        return m
    hf, nat = tiny_pair("llama", seed=5)
    return nat if request.param == "native" else hf


def _ids(n, vocab, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, n), generator=g)


def test_rollback_equals_recompute(model):
    V = model.vocab_size
    prefix, junk, nxt = _ids(10, V, 1), _ids(6, V, 2), _ids(4, V, 3)
    cache = model.new_cache(1, 64)
    model.forward(cache, prefix)
    model.forward(cache, junk)                        # a rejected draft
    assert cache.length == 16
    cache.rollback(10)
    assert cache.length == 10
    got = model.forward(cache, nxt)
    ref = model.forward(model.new_cache(1, 64), torch.cat([prefix, nxt], 1))[:, 10:]
    assert (got - ref).abs().max() < TOL
    with pytest.raises(ValueError):
        cache.rollback(99)


def test_rollback_to_zero_then_reuse(model):
    V = model.vocab_size
    a, b = _ids(8, V, 4), _ids(8, V, 5)
    cache = model.new_cache(1, 32)
    model.forward(cache, a)
    cache.reset()
    got = model.forward(cache, b)
    ref = model.forward(model.new_cache(1, 32), b)
    assert (got - ref).abs().max() < TOL


def test_compact_tree_path_equals_recompute(model):
    """Feed a tree, keep the path 0 -> 2 -> 4, continue: same as feeding the path alone."""
    V = model.vocab_size
    prefix = _ids(9, V, 6)
    parents = [-1, -1, 0, 1, 2, 2]
    T = len(parents)
    mask = torch.zeros(T, T, dtype=torch.bool)
    depth = torch.zeros(T, dtype=torch.long)
    for i, p in enumerate(parents):
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
            depth[i] = depth[p] + 1
    tree = _ids(T, V, 7)
    cache = model.new_cache(1, 64)
    model.forward(cache, prefix)
    model.forward(cache, tree, (9 + depth)[None], mask[None])
    keep = [0, 2, 4]
    cache.compact(9, keep)
    assert cache.length == 12
    nxt = _ids(3, V, 8)
    got = model.forward(cache, nxt)
    ref = model.forward(model.new_cache(1, 64), torch.cat([prefix, tree[:, keep], nxt], 1))[:, 12:]
    assert (got - ref).abs().max() < TOL


def test_compact_identity_and_empty(model):
    V = model.vocab_size
    ids = _ids(12, V, 9)
    cache = model.new_cache(1, 32)
    model.forward(cache, ids)
    cache.compact(8, [0, 1])                          # already in place: just shortens
    assert cache.length == 10
    nxt = _ids(2, V, 10)
    got = model.forward(cache, nxt)
    ref = model.forward(model.new_cache(1, 32), torch.cat([ids[:, :10], nxt], 1))[:, 10:]
    assert (got - ref).abs().max() < TOL
    cache.compact(5, [])
    assert cache.length == 5


def test_left_padded_batch_equals_rows(model):
    """Prompts of lengths 9, 4, 6, left-padded into one call, then two decode steps."""
    V = model.vocab_size
    prompts = [_ids(n, V, 20 + n)[0] for n in (9, 4, 6)]
    B, L = len(prompts), 9
    ids = torch.zeros(B, L, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = p
        valid[b, L - len(p):] = True
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)                   # (B, L)
    cache = model.new_cache(B, 32)
    out = model.forward(cache, ids, pos, input_valid=valid)           # (B, L, V)
    steps = _ids(2, V, 30, batch=B)                                    # (B, 2)
    lens = torch.tensor([len(p) for p in prompts])
    s1 = model.forward(cache, steps[:, :1], lens[:, None])
    s2 = model.forward(cache, steps[:, 1:], lens[:, None] + 1)
    for b, p in enumerate(prompts):
        ref = model.forward(model.new_cache(1, 32), torch.cat([p, steps[b]])[None])  # (1, n+2, V)
        n = len(p)
        assert (out[b, L - n:] - ref[0, :n]).abs().max() < TOL
        assert (s1[b, 0] - ref[0, n]).abs().max() < TOL
        assert (s2[b, 0] - ref[0, n + 1]).abs().max() < TOL
        assert torch.isfinite(out[b]).all()                            # padding rows stay finite


def test_batched_tree_with_padding(model):
    """A chunk of 3 new tokens per row after a padded prefix, one row masked out."""
    V = model.vocab_size
    prompts = [_ids(n, V, 40 + n)[0] for n in (7, 3)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    valid = torch.zeros(2, 7, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, 7 - len(p):] = p
        valid[b, 7 - len(p):] = True
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache(2, 32)
    model.forward(cache, ids, pos, input_valid=valid)
    chunk = _ids(3, V, 50, batch=2)
    lens = torch.tensor([7, 3])
    got = model.forward(cache, chunk, lens[:, None] + torch.arange(3))
    for b, p in enumerate(prompts):
        ref = model.forward(model.new_cache(1, 32), torch.cat([p, chunk[b]])[None])[0, len(p):]
        assert (got[b] - ref).abs().max() < TOL


def test_capacity_error(model):
    from paradecode.errors import UserError

    cache = model.new_cache(1, 8)
    with pytest.raises(UserError):
        model.forward(cache, _ids(9, model.vocab_size))
