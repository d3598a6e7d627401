"""The compiled attention kernel (``models/kernels``): right answers, and bits independent of the call."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paradecode.models import kernels


@pytest.fixture(scope="module", params=["native", "portable"])
def fn(request):
    """The kernel as the engine builds it, and its portable C path (what a CPU without AVX2 runs)."""
    if request.param == "native":
        f = kernels.attention_kernel()
        if f is None:
            pytest.fail(f"the attention kernel did not build: {kernels.FAILURE}")
        return f
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return kernels.attention_kernel()          # elsewhere the engine's own build is the portable path
    return kernels.load_library(kernels.build(kernels.compiler(), ("-mno-avx2", "-mno-fma"))).pd_attend


def _case(B, T, Hkv, G, D, S, slots, seed):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(B, T, Hkv * G + Hkv, D, generator=g)
    kt = torch.full((B, Hkv, D, slots), float("nan"))          # slots past S are never read into a result
    v = torch.full((B, Hkv, slots, D), float("nan"))
    kt[..., :S] = torch.randn(B, Hkv, D, S, generator=g)
    v[:, :, :S] = torch.randn(B, Hkv, S, D, generator=g)
    return qk, kt, v


def _reference(qk, kt, v, allow, G, S):
    B, T, _, D = qk.shape
    Hkv = kt.shape[1]
    q = qk[:, :, :Hkv * G].double().view(B, T, Hkv, G, D)
    sc = torch.einsum("btkgd,bkds->btkgs", q, kt[..., :S].double()) / math.sqrt(D)
    if allow is not None:
        sc = sc.masked_fill(~allow[:, :, None, None, :], float("-inf"))
    return torch.einsum("btkgs,bksd->btkgd", sc.softmax(-1), v[:, :, :S].double()).reshape(B, T, Hkv * G, D)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 9), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 5, 8]),
       D=st.sampled_from([8, 24, 64, 72, 80, 128]), S0=st.integers(0, 300), masked=st.booleans(),
       seed=st.integers(0, 1000))
def test_attention_kernel_matches_softmax_attention(fn, B, T, Hkv, G, D, S0, masked, seed):
    S = S0 + T
    slots = -(-S // 256) * 256
    qk, kt, v = _case(B, T, Hkv, G, D, S, slots, seed)
    allow = None
    if masked or T > 1 or B > 1:
        g = torch.Generator().manual_seed(seed + 1)
        allow = torch.rand(B, T, S, generator=g) < 0.7
        allow[:, torch.arange(T), S0 + torch.arange(T)] = True              # every token sees itself
    out = torch.empty(B, T, Hkv * G, D)
    kernels.attend(fn, qk, kt, v, allow, out, G, 1 / math.sqrt(D), S)
    torch.testing.assert_close(out.double(), _reference(qk, kt, v, allow, G, S), atol=2e-5, rtol=1e-4)


def test_attention_rows_do_not_depend_on_their_call(fn):
    """A row's bits depend only on its query and on the keys/values it sees, in cache order: not on the
    other rows of the call, nor on masked slots between the visible ones, nor on the storage beyond."""
    B, Hkv, G, D, S = 1, 3, 3, 64, 203
    qk, kt, v = _case(B, 6, Hkv, G, D, S, 256, 0)
    g = torch.Generator().manual_seed(9)
    allow = torch.rand(B, 6, S, generator=g) < 0.6
    allow[0, torch.arange(6), S - 6 + torch.arange(6)] = True
    scale = 1 / math.sqrt(D)
    whole = torch.empty(B, 6, Hkv * G, D)
    kernels.attend(fn, qk, kt, v, allow, whole, G, scale, S)
    for t in range(6):
        # the same query alone, against a compacted cache holding only the slots it may see
        seen = allow[0, t].nonzero().flatten()
        kt1, v1 = torch.zeros(B, Hkv, D, 512), torch.zeros(B, Hkv, 512, D)
        kt1[..., :len(seen)], v1[:, :, :len(seen)] = kt[..., seen], v[:, :, seen]
        one = torch.empty(B, 1, Hkv * G, D)
        kernels.attend(fn, qk[:, t:t + 1].contiguous(), kt1, v1, None, one, G, scale, len(seen))
        assert torch.equal(one[:, 0], whole[:, t]), t


def test_kernels_can_be_turned_off():
    """PARADECODE_KERNELS=0: the engine falls back to PyTorch's attention (chains exact, trees close)."""
    code = ("from paradecode.models.tiny import tiny_model; m = tiny_model(); "
            "from paradecode.models import kernels; print(m.exact_tree_logits, kernels.FAILURE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PARADECODE_KERNELS": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False turned off by PARADECODE_KERNELS=0"

