"""Token trees: mask, positions, paths, truncation; tree calls + KV compaction equal recomputation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paradecode.decoding.tree import Draft, node_depths, path_to, tree_attention_mask, tree_positions


@st.composite
def parent_lists(draw, max_nodes: int = 12):
    n = draw(st.integers(0, max_nodes))
    return [draw(st.integers(-1, i - 1)) for i in range(n)]


def test_chain_helpers():
    d = Draft.chain([5, 6, 7])
    assert d.parents == [-1, 0, 1] and d.is_chain and d.depth == 3 and len(d) == 3
    assert Draft.empty().depth == 0 and Draft.empty().is_chain
    assert torch.equal(tree_attention_mask(d.parents), torch.ones(4, 4, dtype=torch.bool).tril())
    assert tree_positions(d.parents, 7).tolist() == [7, 8, 9, 10]


def test_invalid_parents_rejected():
    with pytest.raises(ValueError):
        Draft([1, 2], [-1, 1])          # a node cannot be its own parent
    with pytest.raises(ValueError):
        Draft([1, 2], [1, -1])          # parent after child
    with pytest.raises(ValueError):
        Draft([1], [-1], torch.ones(2, 4))


@settings(max_examples=60, deadline=None)
@given(parent_lists())
def test_mask_and_positions_match_paths(parents):
    mask = tree_attention_mask(parents)
    pos = tree_positions(parents, 3)
    assert mask.shape == (len(parents) + 1,) * 2 and pos[0] == 3
    for i in range(len(parents)):
        path = path_to(i, parents)
        assert path[-1] == i and all(parents[b] == a for a, b in zip(path, path[1:]))
        seen = {0} | {j + 1 for j in path}
        assert {j for j in range(len(parents) + 1) if mask[i + 1, j]} == seen
        assert int(pos[i + 1]) == 3 + len(path)
    assert not mask[0, 1:].any()


@settings(max_examples=60, deadline=None)
@given(parent_lists(), st.integers(0, 12), st.one_of(st.none(), st.integers(0, 5)))
def test_truncate_keeps_a_valid_tree(parents, max_nodes, max_depth):
    d = Draft(list(range(100, 100 + len(parents))), parents, torch.rand(len(parents), 4))
    t = d.truncate(max_nodes, max_depth)
    assert len(t) <= max_nodes
    assert max_depth is None or t.depth <= max_depth
    # every kept node keeps its token, its q row and its path of tokens
    full = {tok: [d.tokens[j] for j in path_to(i, d.parents)] for i, tok in enumerate(d.tokens)}
    for i, tok in enumerate(t.tokens):
        assert [t.tokens[j] for j in path_to(i, t.parents)] == full[tok]
        assert torch.equal(t.q[i], d.q[tok - 100])
    assert node_depths(t.parents) == [len(full[tok]) for tok in t.tokens]


def _models(pair):
    hf, native = pair
    return {"native": native, "transformers": hf}


@pytest.mark.parametrize("backend", ["native", "transformers"])
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_tree_call_and_compaction_equal_recomputation(tiny_llama_pair, backend, data):
    """Logits at every tree node equal recomputing its path; after compacting the
    accepted path, the next call's logits equal a from-scratch run."""
    model = _models(tiny_llama_pair)[backend]
    V = model.vocab_size
    prompt = data.draw(st.lists(st.integers(3, V - 1), min_size=1, max_size=8))
    parents = data.draw(parent_lists(max_nodes=8))
    tokens = data.draw(st.lists(st.integers(3, V - 1), min_size=len(parents), max_size=len(parents)))
    root, nxt = data.draw(st.integers(3, V - 1)), data.draw(st.integers(3, V - 1))

    cache = model.new_cache(1, 64)
    model.forward(cache, torch.tensor([prompt]))
    start = cache.length
    ids = torch.tensor([[root] + tokens])                                   # (1, n+1)
    logits = model.forward(cache, ids, tree_positions(parents, start)[None],
                           tree_attention_mask(parents)[None])[0]          # (n+1, V)

    def scratch(seq):
        c = model.new_cache(1, 64)
        return model.forward(c, torch.tensor([seq]))[0, -1]                # (V,)

    for i in range(len(parents)):
        path = [tokens[j] for j in path_to(i, parents)]
        torch.testing.assert_close(logits[i + 1], scratch(prompt + [root] + path), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits[0], scratch(prompt + [root]), atol=2e-4, rtol=1e-4)

    leaf = data.draw(st.integers(-1, len(parents) - 1))
    kept = path_to(leaf, parents)
    cache.compact(start, [0] + [j + 1 for j in kept])
    assert cache.length == start + 1 + len(kept)
    after = model.forward(cache, torch.tensor([[nxt]]))[0, -1]
    torch.testing.assert_close(after, scratch(prompt + [root] + [tokens[j] for j in kept] + [nxt]),
                               atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_kernel_models():
    """A tiny Llama in every weight format, with the compiled attention (exact tree logits)."""
    from paradecode.models import kernels
    from paradecode.models.tiny import tiny_hf_model, tiny_native

    if kernels.attention_kernel() is None:
        pytest.fail(f"the attention kernel did not build: {kernels.FAILURE}")
    hf = tiny_hf_model("llama", seed=4, hidden=128, intermediate=384, vocab_size=211)
    return {f: tiny_native(hf, dtype=f) for f in ("float32", "bfloat16", "int8", "int4")}


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "int4"])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_tree_nodes_get_their_chains_logits_bit_for_bit(tiny_kernel_models, fmt, data):
    """With the compiled attention, a tree node's logits equal, bit for bit, those of its path fed as a
    chain in one call after the same prompt, whatever sits between its ancestors in the tree's layout.
    (PyTorch's chunked attention gives only close logits there: the ancestors' slots change the sum order.)"""
    model = tiny_kernel_models[fmt]
    assert model.exact_tree_logits
    V = model.vocab_size
    prompt = data.draw(st.lists(st.integers(3, V - 1), min_size=2, max_size=40))
    parents = data.draw(parent_lists(max_nodes=12))
    tokens = data.draw(st.lists(st.integers(3, V - 1), min_size=len(parents), max_size=len(parents)))
    root = data.draw(st.integers(3, V - 1))

    cache = model.new_cache(1, 128)
    model.forward(cache, torch.tensor([prompt]))
    start = cache.length
    tree = model.forward(cache, torch.tensor([[root] + tokens]), tree_positions(parents, start)[None],
                         tree_attention_mask(parents)[None])[0]            # (n+1, V)
    for i in range(len(parents)):
        cache.rollback(start)
        path = [tokens[j] for j in path_to(i, parents)]
        chain = model.forward(cache, torch.tensor([[root] + path]))[0]      # (len(path)+1, V)
        assert torch.equal(tree[i + 1], chain[-1]), (fmt, i, float((tree[i + 1] - chain[-1]).abs().max()))
        assert torch.equal(tree[0], chain[0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=1, max_size=20).flatmap(
    lambda toks: st.tuples(st.just(toks), st.tuples(*[st.integers(-1, i - 1) for i in range(len(toks))]))))
def test_preorder_order_maps_preorder_positions_to_proposal_positions(tree):
    """``preorder_order(parents)[i]`` is the proposal position of the node ``preorder()`` puts at i (the loop's
    sizing learns from the accepted nodes' proposal positions)."""
    from paradecode.decoding.tree import preorder_order

    tokens, parents = tree
    d = Draft(list(tokens), list(parents))
    order, pre = preorder_order(d.parents), d.preorder()
    assert sorted(order) == list(range(len(d)))
    assert pre.tokens == [d.tokens[j] for j in order]
    assert all(pre.parents[i] == -1 or order[pre.parents[i]] == d.parents[order[i]] for i in range(len(d)))
