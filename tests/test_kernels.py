"""The compiled kernels (``models/kernels``): attention and the layer glue, right answers, and bits independent
of the call."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paradecode.models import kernels


@pytest.fixture(scope="module", params=["native", "portable"])
def lib(request):
    """The kernels as the engine builds them, and their portable C path (what a CPU without AVX2 runs)."""
    native = kernels._load()
    if native is None:
        pytest.fail(f"the kernels did not build: {kernels.FAILURE}")
    import platform

    if request.param == "native" or platform.machine().lower() not in ("x86_64", "amd64"):
        return native                              # off x86 the engine's own build is the portable path
    return kernels.load_library(kernels.build(kernels.compiler(), ("-mno-avx2", "-mno-fma")))


@pytest.fixture(scope="module")
def fn(lib):
    return lib.pd_attend


@pytest.fixture(scope="module")
def glue(lib):
    return kernels.LayerGlue(lib)


# the KV caches the kernels take: float32 keys transposed or in 16-slot blocks, bfloat16 keys in 16-slot blocks
# with the dimensions in pairs (the engine's caches are blocked)
CACHES = [("float32", False), ("float32", True), ("bfloat16", True)]


def _case(B, T, Hkv, G, D, S, slots, seed, dtype="float32", blocked=False):
    """Queries and new keys, and a cache of ``slots`` slots whose first S hold keys and values (transposed keys,
    float32: the reference's layout; see :func:`_stored` for the others)."""
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(B, T, Hkv * G + Hkv, D, generator=g)
    kt = torch.full((B, Hkv, D, slots), float("nan"))          # slots past S are never read into a result
    v = torch.full((B, Hkv, slots, D), float("nan"))
    kt[..., :S] = torch.randn(B, Hkv, D, S, generator=g)
    v[:, :, :S] = torch.randn(B, Hkv, S, D, generator=g)
    return (qk, *_stored(kt, v, dtype, blocked))


def _stored(kt, v, dtype="float32", blocked=False):
    """Transposed float32 keys and values as a cache of ``dtype`` stores them, keys blocked or not."""
    kt, v = kt.to(getattr(torch, dtype)), v.to(getattr(torch, dtype))
    B, Hkv, D, slots = kt.shape
    if dtype == "bfloat16":             # (B, Hkv, D/2, 2, blocks, 16) -> (B, Hkv, blocks, D/2, 16, 2)
        assert blocked, "bfloat16 keys are always blocked"
        kt = kt.view(B, Hkv, D // 2, 2, slots // 16, 16).permute(0, 1, 4, 2, 5, 3).contiguous()
    elif blocked:
        kt = kt.view(B, Hkv, D, slots // 16, 16).permute(0, 1, 3, 2, 4).contiguous()
    return kt, v


def _transposed(kt):
    """Keys as float32 (B, Hkv, D, slots), from either layout."""
    if kt.dim() == 6:
        B, Hkv, NB, D2, _, _ = kt.shape
        kt = kt.permute(0, 1, 3, 5, 2, 4).reshape(B, Hkv, 2 * D2, NB * 16)
    elif kt.dim() == 5:
        B, Hkv, NB, D, _ = kt.shape
        kt = kt.transpose(2, 3).reshape(B, Hkv, D, NB * 16)
    return kt.float()


def _reference(qk, kt, v, allow, G, S):
    B, T, _, D = qk.shape
    kt, v = _transposed(kt), v.float()
    Hkv = kt.shape[1]
    q = qk[:, :, :Hkv * G].double().view(B, T, Hkv, G, D)
    sc = torch.einsum("btkgd,bkds->btkgs", q, kt[..., :S].double()) / math.sqrt(D)
    if allow is not None:
        sc = sc.masked_fill(~allow[:, :, None, None, :], float("-inf"))
    return torch.einsum("btkgs,bksd->btkgd", sc.softmax(-1), v[:, :, :S].double()).reshape(B, T, Hkv * G, D)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 9), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 5, 8]),
       D=st.sampled_from([8, 24, 64, 72, 80, 128]), S0=st.integers(0, 300), masked=st.booleans(),
       cache=st.sampled_from(CACHES), seed=st.integers(0, 1000))
def test_attention_kernel_matches_softmax_attention(fn, B, T, Hkv, G, D, S0, masked, cache, seed):
    """Against softmax attention in float64 over the stored keys and values (a bfloat16 cache's elements
    widen exactly), for every cache the kernels take."""
    S = S0 + T
    slots = -(-S // 256) * 256
    qk, kt, v = _case(B, T, Hkv, G, D, S, slots, seed, *cache)
    allow = None
    if masked or T > 1 or B > 1:
        g = torch.Generator().manual_seed(seed + 1)
        allow = torch.rand(B, T, S, generator=g) < 0.7
        allow[:, torch.arange(T), S0 + torch.arange(T)] = True              # every token sees itself
    out = torch.empty(B, T, Hkv * G, D)
    kernels.attend(fn, qk, kt, v, allow, out, G, 1 / math.sqrt(D), S)
    torch.testing.assert_close(out.double(), _reference(qk, kt, v, allow, G, S), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("head", [0, 150])
def test_attention_rows_do_not_depend_on_their_call(fn, head, cache):
    """A row's bits depend only on its query and on the keys/values it sees, in cache order: not on the
    other rows of the call, nor on masked slots between the visible ones, nor on the storage beyond. With
    head = 150 every token sees the first 150 slots (a cached prefix, as in verification), which the
    kernel takes with straight vector loads, and scattered slots after them."""
    B, Hkv, G, D, S = 1, 3, 3, 64, 203
    qk, kt, v = _case(B, 11, Hkv, G, D, S, 256, 0, *cache)
    g = torch.Generator().manual_seed(9)
    allow = torch.rand(B, 11, S, generator=g) < 0.6
    allow[:, :, :head] = True
    allow[0, torch.arange(11), S - 11 + torch.arange(11)] = True
    scale = 1 / math.sqrt(D)
    whole = torch.empty(B, 11, Hkv * G, D)                 # two blocks of tokens (8 + 3)
    kernels.attend(fn, qk, kt, v, allow, whole, G, scale, S)
    for t in range(11):
        # the same query alone, against a compacted cache holding only the slots it may see
        seen = allow[0, t].nonzero().flatten()
        kt1, v1 = torch.zeros(B, Hkv, D, 512), torch.zeros(B, Hkv, 512, D)
        kt1[..., :len(seen)], v1[:, :, :len(seen)] = _transposed(kt)[..., seen], v[:, :, seen].float()
        kt1, v1 = _stored(kt1, v1, *cache)
        one = torch.empty(B, 1, Hkv * G, D)
        kernels.attend(fn, qk[:, t:t + 1].contiguous(), kt1, v1, None, one, G, scale, len(seen))
        assert torch.equal(one[:, 0], whole[:, t]), t


@pytest.mark.parametrize("cache", [("float32", False), ("bfloat16", True)])
@pytest.mark.parametrize("G, D", [(3, 64), (8, 80), (2, 128)])
def test_attention_has_the_same_bits_with_and_without_avx512(tmp_path, G, D, cache):
    """The AVX-512 scores and weighted sums (where the CPU has them) do each lane's operations in the AVX2
    code's order: the same bits (D = 80: AVX-512 scores, AVX2 weighted sums)."""
    code = (f"import math; from test_kernels import _case; qk, kt, v = _case(1, 11, 2, {G}, {D}, 300, 320, 4,"
            f" *{cache!r});"
            f"g = torch.Generator().manual_seed(2); allow = torch.rand(1, 11, 300, generator=g) < 0.7;"
            f"y = torch.empty(1, 11, 2 * {G}, {D});"
            f"kernels.attend(kernels.attention_kernel(), qk, kt, v, allow, y, {G}, 1 / math.sqrt({D}), 300)")
    qk, kt, v = _case(1, 11, 2, G, D, 300, 320, 4, *cache)
    allow = torch.rand(1, 11, 300, generator=torch.Generator().manual_seed(2)) < 0.7
    y = torch.empty(1, 11, 2 * G, D)
    kernels.attend(kernels.attention_kernel(), qk, kt, v, allow, y, G, 1 / math.sqrt(D), 300)
    assert torch.equal(_without_avx512(tmp_path, f"sys.path.insert(0, {str(Path(__file__).parent)!r}); " + code), y)


def test_kernels_can_be_turned_off():
    """PARADECODE_KERNELS=0: the engine falls back to PyTorch's attention (chains exact, trees close)."""
    code = ("from paradecode.models.tiny import tiny_model; m = tiny_model(); "
            "from paradecode.models import kernels; print(m.exact_tree_logits, kernels.FAILURE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PARADECODE_KERNELS": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False turned off by PARADECODE_KERNELS=0"


def _bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """bfloat16 results within one rounding step of the float64 reference."""
    torch.testing.assert_close(got.double(), want.double(), atol=1e-6, rtol=2 ** -7)


@settings(max_examples=25, deadline=None)
@given(R=st.integers(1, 9), H=st.sampled_from([8, 13, 64, 576]), delta=st.sampled_from([None, "float32", "bfloat16"]),
       out=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 1000))
def test_add_rmsnorm_matches_llama_rmsnorm(glue, R, H, delta, out, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, H, generator=g) * 3
    w = torch.randn(H, generator=g)
    d = None if delta is None else torch.randn(R, H, generator=g).to(getattr(torch, delta))
    want_x = x.double() + (0 if d is None else d.double())
    want = w.double() * want_x * torch.rsqrt(want_x.pow(2).mean(-1, keepdim=True) + 1e-5)
    h = torch.empty(R, H, dtype=getattr(torch, out))
    glue.add_rmsnorm(x, d, w, 1e-5, h)
    torch.testing.assert_close(x.double(), want_x, atol=1e-6, rtol=1e-6)
    if out == "float32":
        torch.testing.assert_close(h.double(), want, atol=1e-5, rtol=1e-5)
    else:
        _bf16_close(h, want)


@settings(max_examples=25, deadline=None)
@given(R=st.integers(1, 9), I=st.sampled_from([3, 8, 21, 1536]), kind=st.sampled_from(["float32", "bfloat16"]),
       seed=st.integers(0, 1000))
def test_silu_mul_matches_torch(glue, R, I, kind, seed):
    g = torch.Generator().manual_seed(seed)
    gu = (torch.randn(R, 2 * I, generator=g) * 6).to(getattr(torch, kind))
    gu[0, 0] = 100.0                                   # e^-g underflows / overflows: still finite
    if I > 1:
        gu[0, 1] = -100.0
    want = torch.nn.functional.silu(gu[:, :I].double()) * gu[:, I:].double()
    out = torch.empty(R, I, dtype=gu.dtype)
    glue.silu_mul(gu, out)
    if kind == "float32":
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    else:
        _bf16_close(out, want)


@pytest.mark.parametrize("I", [21, 1536])
def test_silu_mul_has_the_same_bits_with_and_without_avx512(tmp_path, I):
    """The AVX-512 SiLU (where the CPU has it) does each lane's operations of the AVX2 loop: the same bits,
    including gates whose exponential underflows or overflows."""
    code = (f"g = torch.Generator().manual_seed(7); gu = torch.randn(5, 2 * {I}, generator=g) * 12;"
            f"gu[0, :4] = torch.tensor([100.0, -100.0, 88.5, -87.0]); y = torch.empty(5, {I});"
            f"kernels.layer_glue().silu_mul(gu, y)")
    g = torch.Generator().manual_seed(7)
    gu = torch.randn(5, 2 * I, generator=g) * 12
    gu[0, :4] = torch.tensor([100.0, -100.0, 88.5, -87.0])
    y = torch.empty(5, I)
    kernels.layer_glue().silu_mul(gu, y)
    assert torch.equal(_without_avx512(tmp_path, code), y)


def _rope_case(B, T, Hkv, G, D, L0, kind, seed, cache=("float32", False)):
    g = torch.Generator().manual_seed(seed)
    Hq = Hkv * G
    qkv = torch.randn(B * T, (Hq + 2 * Hkv) * D, generator=g).to(getattr(torch, kind))
    ang = torch.rand(B * T, D // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    kt = torch.randn(B, Hkv, D, 256, generator=g)
    v = torch.randn(B, Hkv, 256, D, generator=g)
    return (qkv, cos.contiguous(), sin.contiguous(), *_stored(kt, v, *cache))


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 6), Hkv=st.integers(1, 3), G=st.sampled_from([1, 3]),
       D=st.sampled_from([8, 64]), L0=st.integers(0, 40), kind=st.sampled_from(["float32", "bfloat16"]),
       cache=st.sampled_from(CACHES), seed=st.integers(0, 1000))
def test_rope_attend_matches_rope_then_attention(glue, B, T, Hkv, G, D, L0, kind, cache, seed):
    """RoPE (rotate_half, as transformers), the new keys and values written to slots L0.. (rounded to a
    bfloat16 cache's precision), causal attention over what the cache then holds."""
    qkv, cos, sin, kt, v = _rope_case(B, T, Hkv, G, D, L0, kind, seed, cache)
    Hq, S = Hkv * G, L0 + T
    x = qkv.double().view(B, T, Hq + 2 * Hkv, D)
    c, s = cos.double().view(B, T, 1, D), sin.double().view(B, T, 1, D)
    rot = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
    qk = x * c + rot * s                                                     # rotated q, k (and v: unused)
    want_k = qk[:, :, Hq:Hq + Hkv].permute(0, 2, 3, 1)                     # (B, Hkv, D, T)
    want_v = x[:, :, Hq + Hkv:].transpose(1, 2)                              # (B, Hkv, T, D)
    before_k, before_v = _transposed(kt).clone(), v.float().clone()
    allow = torch.ones(B, T, S, dtype=torch.bool)
    allow[:, :, L0:] = torch.ones(T, T, dtype=torch.bool).tril()
    scratch, att = torch.empty(B * T, Hq + Hkv, D), torch.empty(B * T, Hq * D)
    out = att if kind == "float32" else torch.empty(B * T + 3, Hq * D, dtype=torch.bfloat16)
    glue.rope_attend(qkv, cos, sin, kt, v, allow, scratch, att, out, G, L0, 1 / math.sqrt(D))
    tol = dict(atol=1e-5, rtol=1e-5) if cache[0] == "float32" else dict(atol=1e-6, rtol=2 ** -8)
    got_k, got_v = _transposed(kt), v.float()
    torch.testing.assert_close(got_k[..., L0:S].double(), want_k, **tol)
    torch.testing.assert_close(got_v[:, :, L0:S].double(), want_v, **tol)
    assert torch.equal(got_k[..., :L0], before_k[..., :L0]) and torch.equal(got_k[..., S:], before_k[..., S:])
    assert torch.equal(got_v[:, :, :L0], before_v[:, :, :L0]) and torch.equal(got_v[:, :, S:], before_v[:, :, S:])
    want = _reference(qk[:, :, :Hq + Hkv].float(), kt, v, allow, G, S).reshape(B * T, Hq * D)
    torch.testing.assert_close(att.double(), want, atol=1e-4, rtol=1e-4)
    if kind == "bfloat16":
        assert torch.equal(out[:B * T], att.to(torch.bfloat16))              # the cast, rounded as torch rounds


@pytest.mark.parametrize("kind, cache", [("float32", ("float32", False)), ("float32", ("float32", True)),
                                         ("bfloat16", ("bfloat16", True))])
def test_layer_glue_rows_do_not_depend_on_their_call(glue, kind, cache):
    """Each row of a 7-row call has the bits it gets alone (norm, SiLU) and a token's attention output has
    the bits it gets when its block is fed one token at a time (RoPE, cache write, attention)."""
    dt = getattr(torch, kind)
    g = torch.Generator().manual_seed(3)
    x, d, w = torch.randn(7, 576, generator=g), torch.randn(7, 576, generator=g).to(dt), torch.randn(576, generator=g)
    whole = torch.empty(7, 576, dtype=dt)
    xw = x.clone()
    glue.add_rmsnorm(xw, d, w, 1e-5, whole)
    gu = torch.randn(7, 2 * 1536, generator=g).to(dt)
    mw = torch.empty(7, 1536, dtype=dt)
    glue.silu_mul(gu, mw)
    for r in range(7):
        one, xr, mr = torch.empty(1, 576, dtype=dt), x[r:r + 1].clone(), torch.empty(1, 1536, dtype=dt)
        glue.add_rmsnorm(xr, d[r:r + 1], w, 1e-5, one)
        glue.silu_mul(gu[r:r + 1], mr)
        assert torch.equal(one, whole[r:r + 1]) and torch.equal(xr, xw[r:r + 1]) and torch.equal(mr, mw[r:r + 1]), r
    T, Hkv, G, D, L0 = 5, 3, 3, 64, 37
    qkv, cos, sin, kt, v = _rope_case(1, T, Hkv, G, D, L0, kind, 4, cache)
    Hq = Hkv * G
    att = torch.empty(T, Hq * D)
    glue.rope_attend(qkv, cos, sin, kt, v, None if T == 1 else
                     torch.cat([torch.ones(1, T, L0, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()[None]], -1),
                     torch.empty(T, Hq + Hkv, D), att, att if kind == "float32" else torch.empty(T, Hq * D, dtype=dt),
                     G, L0, 1 / math.sqrt(D))
    for t in range(T):
        one = torch.empty(1, Hq * D)
        glue.rope_attend(qkv[t:t + 1], cos[t:t + 1], sin[t:t + 1], kt, v, None, torch.empty(1, Hq + Hkv, D), one,
                         one if kind == "float32" else torch.empty(1, Hq * D, dtype=dt), G, L0 + t, 1 / math.sqrt(D))
        assert torch.equal(one, att[t:t + 1]), t


def _without_avx512(tmp_path, code: str, switch: str = "PARADECODE_NO_AVX512") -> torch.Tensor:
    """``y`` as ``code`` computes it in a fresh process with the kernels' AVX-512 paths (``switch``:
    ``PARADECODE_NO_AMX``: the AMX path only) turned off (``torch`` and ``kernels`` are imported for it)."""
    out = tmp_path / f"{switch}.pt"
    script = f"import sys, torch; from paradecode.models import kernels; {code}; torch.save(y, sys.argv[1])"
    run = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, switch: "1"})
    assert run.returncode == 0, run.stderr
    return torch.load(out)


def _int4_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``int4.c``'s formula in float64: the weight's int4 codes (``int4_codes``) times each row's groups of 32
    activations quantized to int8 (d = max |a| / 127 and round(a / d), in float32 as the kernel does)."""
    from paradecode.models.quant import int4_codes

    q, scale, zero = int4_codes(w)                                               # (N, K), (N, K/32) x 2
    M, K = x.shape
    a = x.float().view(M, K // 32, 32)
    d = a.abs().amax(-1) / 127.0                                                 # (M, K/32) float32
    qa = torch.where(d[..., None] > 0, torch.round(a / d[..., None].clamp(min=1e-38)), 0.0).clamp(-127, 127)
    dots = torch.einsum("nbk,mbk->mnb", q.double().view(-1, K // 32, 32), qa.double())   # exact integers
    idot = dots - 8 * qa.double().sum(-1)[:, None, :]
    return (scale.double()[None] * d.double()[:, None, :] * idot + zero.double()[None] * a.double().sum(-1)[:, None, :]).sum(-1)


@settings(max_examples=20, deadline=None)
@given(M=st.integers(1, 9), N=st.integers(1, 40), KB=st.integers(1, 6), kind=st.sampled_from(["float32", "bfloat16"]),
       seed=st.integers(0, 1000))
def test_int4_kernel_computes_its_formula(lib, M, N, KB, kind, seed):
    from paradecode.models.quant import pack_int4_w4a8

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, 32 * KB, generator=g) * 0.1
    x = (torch.randn(M, 32 * KB, generator=g) * 2).to(getattr(torch, kind))
    if M > 1:
        x[1, :32] = 0                                                            # an all-zero group: d = 0
    y = kernels.int4_mm(x, pack_int4_w4a8(w), lib)
    _bf16_close(y, _int4_reference(x, w))


def test_int4_kernel_rows_and_paths_agree_bit_for_bit(lib, tmp_path):
    """An output's bits depend on its row and channel only: alone or with 12 other rows, in plain C as with
    AVX2, and (on a CPU with AVX-512 VNNI) on the AVX-512 path as on the AVX2 one. Close to the
    bfloat16-activation product."""
    from paradecode.models.quant import linear, pack_int4_w4a8, quantize_int4

    g = torch.Generator().manual_seed(1)
    w = torch.randn(600, 576, generator=g) * 0.05
    x = torch.randn(13, 576, generator=g).to(torch.bfloat16)
    packed = pack_int4_w4a8(w)
    whole = kernels.int4_mm(x, packed, lib)
    assert torch.equal(whole, kernels.int4_mm(x, packed))             # the portable C build too
    for r in range(13):
        assert torch.equal(kernels.int4_mm(x[r:r + 1], packed, lib), whole[r:r + 1]), r
    avx2 = _without_avx512(tmp_path, "from paradecode.models.quant import pack_int4_w4a8;"
                           "g = torch.Generator().manual_seed(1); w = torch.randn(600, 576, generator=g) * 0.05;"
                           "x = torch.randn(13, 576, generator=g).to(torch.bfloat16); y = kernels.int4_mm(x, pack_int4_w4a8(w))")
    assert torch.equal(avx2, kernels.int4_mm(x, packed))
    ref = linear(x, quantize_int4(w)).float()                                   # int4 x bfloat16 (PyTorch)
    assert float((whole.float() - ref).abs().max()) < 0.02 * float(ref.abs().max())


def _int4_a16_exact(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The A16 variant's weights (``int4_codes_f16``: q * scale + low) times x, in float64."""
    from paradecode.models.quant import int4_codes_f16

    q, scale, low = int4_codes_f16(w)
    N, K = w.shape
    deq = q.double().view(N, K // 32, 32) * scale.double()[..., None] + low.double()[..., None]
    return x.double() @ deq.view(N, K).T


@settings(max_examples=20, deadline=None)
@given(M=st.integers(1, 9), N=st.integers(1, 40), KB=st.integers(2, 6), kind=st.sampled_from(["float32", "bfloat16"]),
       seed=st.integers(0, 1000))
def test_int4_a16_kernel_is_its_weights_product_to_output_rounding(lib, M, N, KB, kind, seed):
    """The A16 variant's two levels of activations leave only the bfloat16 output's rounding: within 2^-8 of
    the largest output (one level alone is not: see the next test)."""
    from paradecode.models.quant import pack_int4_w4a16

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, 32 * KB, generator=g) * 0.1
    x = (torch.randn(M, 32 * KB, generator=g) * 2).to(getattr(torch, kind))
    if M > 1:
        x[1, :32] = 0                                                            # an all-zero group: d = 0
    if M > 2:
        x[2, 32:64] = 0.5                                                        # equal inputs: no residual
    ref = _int4_a16_exact(x, w)
    bound = 2 ** -8 * float(ref.abs().max()) + 1e-6
    assert float((kernels.int4_mm(x, pack_int4_w4a16(w), lib).double() - ref).abs().max()) <= bound


def test_int4_a16_kernel_rows_and_paths_agree_bit_for_bit(lib, tmp_path):
    """As the W4A8 kernel's: an output's bits depend on its row and channel only, alike in plain C, with AVX2
    and with AVX-512 VNNI; and the layer stack's kind for these weights runs the same kernel. The bound of the
    test above would catch a kernel that dropped the second level."""
    from paradecode.models.quant import pack_int4_w4a16

    g = torch.Generator().manual_seed(3)
    w = torch.randn(600, 576, generator=g) * 0.05
    x = torch.randn(13, 576, generator=g).to(torch.bfloat16)
    packed = pack_int4_w4a16(w)
    whole = kernels.int4_mm(x, packed, lib)
    ref = _int4_a16_exact(x, w)
    bound = 2 ** -8 * float(ref.abs().max())
    assert float((whole.double() - ref).abs().max()) <= bound
    a = x.double().view(13, 18, 32)
    d1 = a.abs().amax(-1, keepdim=True) / 127
    one_level = (torch.round(a / d1) * d1).view(13, 576)                         # the first level alone
    assert float((_int4_a16_exact(one_level, w) - ref).abs().max()) > bound
    assert torch.equal(whole, kernels.int4_mm(x, packed))             # the portable C build too
    for r in range(13):
        assert torch.equal(kernels.int4_mm(x[r:r + 1], packed, lib), whole[r:r + 1]), r
    avx2 = _without_avx512(tmp_path, "from paradecode.models.quant import pack_int4_w4a16;"
                           "g = torch.Generator().manual_seed(3); w = torch.randn(600, 576, generator=g) * 0.05;"
                           "x = torch.randn(13, 576, generator=g).to(torch.bfloat16);"
                           "y = kernels.int4_mm(x, pack_int4_w4a16(w))")
    assert torch.equal(avx2, kernels.int4_mm(x, packed))
    assert kernels._mat(packed, torch.bfloat16).kind == 6


def test_int4_f16_codes_recover_q4_1_blocks_and_refuse_what_float16_cannot_hold():
    from paradecode.models.quant import int4_codes_f16, pack_int4_w4a16

    g = torch.Generator().manual_seed(4)
    d = (torch.rand(48, 4, generator=g) * 0.01 + 1e-3).half()
    m = (-torch.rand(48, 4, generator=g) * 0.1).half()
    codes = torch.randint(0, 16, (48, 4, 32), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15                                         # as GGUF's quantizer leaves them
    w = (d.float()[..., None] * codes + m.float()[..., None]).view(48, 128)      # the float32 a GGUF loader gives
    q, scale, low = int4_codes_f16(w)
    assert torch.equal(q.view(48, 4, 32), codes.int()) and torch.equal(scale, d) and torch.equal(low, m)
    w[3, 5] = 1e6                                                                # beyond float16
    with pytest.raises(ValueError, match="float16"):
        pack_int4_w4a16(w)


@settings(max_examples=20, deadline=None)
@given(M=st.integers(1, 19), N=st.integers(1, 70), K=st.integers(1, 90), seed=st.integers(0, 1000))
def test_f32_kernel_matches_the_product(lib, M, N, K, seed):
    """Any shape (partial panels, odd panel counts, row blocks of every size): close to the float64 product."""
    from paradecode.models.quant import pack_f32

    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    y = kernels.f32_mm(x, pack_f32(w), lib)
    ref = x.double() @ w.double().T
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert float((y.double() - ref).abs().max()) <= 1e-5 * K * max(1.0, float(ref.abs().max()))


def _f32_chain_reference(x: torch.Tensor, w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``f32.c``'s sums in float32 steps: per block of 64 inputs, acc = fma(x[k], w[k], acc) in input order, the
    blocks' sums then added in order. A fused multiply-add rounds once: the float64 product of two floats is
    exact, and rounding the float64 sum of it and a float32 to float32 agrees with one rounding except at
    double-rounding ties, which random data does not hit."""
    total = None
    for k0 in range(0, x.shape[1], block):
        acc = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
        for k in range(k0, min(k0 + block, x.shape[1])):
            acc = (acc + x[:, k:k + 1].double() * w[:, k].double()[None]).float().double()
        total = acc.float() if total is None else total + acc.float()
    return total


def test_f32_kernel_rows_and_paths_agree_bit_for_bit(lib, tmp_path):
    """An output's bits depend on its row and channel only: alone or with 18 other rows, in plain C as with
    AVX2, and (on a CPU with AVX-512) on the AVX-512 path as on the AVX2 one; they are the bits of the kernel's
    block sums of fused multiply-adds."""
    from paradecode.models.quant import pack_f32

    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(600, 576, generator=g) * 0.05, torch.randn(19, 576, generator=g)
    packed = pack_f32(w)
    whole = kernels.f32_mm(x, packed, lib)
    assert torch.equal(whole, kernels.f32_mm(x, packed))               # the portable C build too
    for r in range(19):
        assert torch.equal(kernels.f32_mm(x[r:r + 1], packed, lib), whole[r:r + 1]), r
    assert torch.equal(whole[:3, :40], _f32_chain_reference(x[:3], w[:40]))
    avx2 = _without_avx512(tmp_path, "from paradecode.models.quant import pack_f32;"
                           "g = torch.Generator().manual_seed(2); w = torch.randn(600, 576, generator=g) * 0.05;"
                           "x = torch.randn(19, 576, generator=g); y = kernels.f32_mm(x, pack_f32(w))")
    assert torch.equal(avx2, whole)


@settings(max_examples=20, deadline=None)
@given(M=st.integers(1, 19), N=st.integers(1, 70), K=st.integers(1, 90), kind=st.sampled_from(["float32", "bfloat16"]),
       seed=st.integers(0, 1000))
def test_i8_kernel_matches_the_product(lib, M, N, K, kind, seed):
    """int8 panels: scale * (x times the int8 values), close to float64, out in float32 or in x's dtype."""
    from paradecode.models.quant import pack_int8_panels, quantize_int8

    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g).to(getattr(torch, kind))
    q = quantize_int8(w)
    ref = x.double() @ q.dequantize().double().T
    y = kernels.i8_mm(x, pack_int8_panels(q), torch.float32, lib)
    assert y.shape == (M, N) and float((y.double() - ref).abs().max()) <= 1e-5 * K * max(1.0, float(ref.abs().max()))
    yb = kernels.i8_mm(x, pack_int8_panels(q), torch.bfloat16, lib)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y.to(torch.bfloat16))     # one rounding of the same sums


def test_i8_kernel_rows_and_paths_agree_bit_for_bit(lib, tmp_path):
    """As for float32: an output's bits depend on its row and channel only, on every path; they are the
    float32 kernel's sums of the int8 values (converted exactly) times the channel's scale."""
    from paradecode.models.quant import pack_f32, pack_int8_panels, quantize_int8

    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(600, 576, generator=g) * 0.05, torch.randn(19, 576, generator=g).to(torch.bfloat16)
    q = quantize_int8(w)
    packed = pack_int8_panels(q, float_out=True)
    whole = kernels.i8_mm(x, packed, torch.float32, lib)
    assert torch.equal(whole, kernels.i8_mm(x, packed, torch.float32))          # the portable C build too
    for r in range(19):
        assert torch.equal(kernels.i8_mm(x[r:r + 1], packed, torch.float32, lib), whole[r:r + 1]), r
    sums = kernels.f32_mm(x.float(), pack_f32(q.q.float()), lib)
    assert torch.equal(whole, sums * q.scale.float())
    avx2 = _without_avx512(tmp_path, "from paradecode.models.quant import pack_int8_panels, quantize_int8;"
                           "g = torch.Generator().manual_seed(4); w = torch.randn(600, 576, generator=g) * 0.05;"
                           "x = torch.randn(19, 576, generator=g).to(torch.bfloat16);"
                           "y = kernels.i8_mm(x, pack_int8_panels(quantize_int8(w)), torch.float32)")
    assert torch.equal(avx2, whole)


@pytest.mark.parametrize("pack", ["pack_int8_panels", "pack_int8_i15"])
def test_int8_packings_hold_the_quantized_matrix(pack):
    """The packings only reorder (pack_int8_i15: and offset) the int8 values; rows (the embedding lookup) equal
    the Int8Weight's."""
    from paradecode.models import quant

    q = quant.quantize_int8(torch.randn(37, 24))
    packed = getattr(quant, pack)(q)
    assert packed.shape == (37, 24) and packed.padded == 48
    assert torch.equal(packed.dequantize(), q.dequantize())
    ids = torch.tensor([[0, 36, 17], [16, 15, 1]])
    assert torch.equal(packed.rows(ids), q.rows(ids))


def _i15_reference(x: torch.Tensor, q) -> torch.Tensor:
    """``int8.c``'s formula in float64: each row scaled to integers round(x / d), d = max |x| / 16319 (in float32
    as the kernel computes it), times the int8 values, times d and the channel's scale."""
    xf = x.float()
    d = xf.abs().amax(1, keepdim=True) / 16319.0                                 # (M, 1) float32
    qx = torch.where(d > 0, torch.round(xf / d.clamp(min=1e-38)), 0.0).clamp(-16319, 16319)
    return (qx.double() @ q.q.double().T) * (q.scale.float()[None] * d).double()


@settings(max_examples=25, deadline=None)
@given(M=st.integers(1, 20), N=st.integers(1, 70), K4=st.integers(1, 40), kind=st.sampled_from(["float32", "bfloat16"]),
       seed=st.integers(0, 1000))
def test_i15_kernel_computes_its_formula(lib, M, N, K4, kind, seed):
    """The int8 kernel (any shape: partial panels, tile steps and row blocks of every size, an all-zero row):
    its formula's value, rounded once to float32; bfloat16 outputs are that value rounded again."""
    from paradecode.models.quant import pack_int8_i15, quantize_int8

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, 4 * K4, generator=g) * 0.1
    x = (torch.randn(M, 4 * K4, generator=g) * 3).to(getattr(torch, kind))
    if M > 1:
        x[1] = 0
    q = quantize_int8(w)
    y = kernels.i8_i15_mm(x, pack_int8_i15(q, float_out=True), torch.float32, lib)
    ref = _i15_reference(x, q)
    assert y.shape == (M, N) and float((y.double() - ref).abs().max()) <= 1e-6 * max(1e-3, float(ref.abs().max()))
    yb = kernels.i8_i15_mm(x, pack_int8_i15(q), torch.bfloat16, lib)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y.to(torch.bfloat16))


def test_i15_kernel_rows_and_paths_agree_bit_for_bit(lib, tmp_path):
    """An output's bits depend on its row and channel only: alone, in blocks below and above the AMX
    threshold, in plain C as with AVX2, with AVX-512 VNNI as on AMX tiles (where the CPU has them; 39 panels:
    AMX takes them in pairs, the last alone). Close to the product with the bfloat16 activations themselves."""
    from paradecode.models.quant import pack_int8_i15, quantize_int8

    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(616, 576, generator=g) * 0.05, torch.randn(37, 576, generator=g).to(torch.bfloat16)
    q = quantize_int8(w)
    packed = pack_int8_i15(q, float_out=True)
    whole = kernels.i8_i15_mm(x, packed, torch.float32, lib)
    assert torch.equal(whole, kernels.i8_i15_mm(x, packed, torch.float32))     # the portable C build too
    for r in range(37):
        assert torch.equal(kernels.i8_i15_mm(x[r:r + 1], packed, torch.float32, lib), whole[r:r + 1]), r
    for rows in (2, 3, 4, 5, 8, 16, 17, 33):
        assert torch.equal(kernels.i8_i15_mm(x[:rows], packed, torch.float32, lib), whole[:rows]), rows
    code = ("from paradecode.models.quant import pack_int8_i15, quantize_int8;"
            "g = torch.Generator().manual_seed(5); w = torch.randn(616, 576, generator=g) * 0.05;"
            "x = torch.randn(37, 576, generator=g).to(torch.bfloat16);"
            "y = kernels.i8_i15_mm(x, pack_int8_i15(quantize_int8(w), float_out=True), torch.float32)")
    assert torch.equal(_without_avx512(tmp_path, code), whole)
    assert torch.equal(_without_avx512(tmp_path, code, "PARADECODE_NO_AMX"), whole)
    plain = x.double() @ q.dequantize().double().T
    assert float((whole.double() - plain).abs().max()) < 1e-3 * float(plain.abs().max())


def test_f32_panels_hold_the_matrix():
    """The packing only reorders: the plain matrix and its rows (the embedding lookup) come back exactly."""
    from paradecode.models.quant import pack_f32

    w = torch.randn(37, 24)
    packed = pack_f32(w)
    assert packed.shape == (37, 24) and packed.padded == 48
    assert torch.equal(packed.dequantize(), w)
    ids = torch.tensor([[0, 36, 17], [16, 15, 1]])
    assert torch.equal(packed.rows(ids), w[ids])


def test_products_have_the_same_bits_on_any_thread_count():
    """The int4, int8 and panel products deal output channels out to threads (5 rows: on AMX tiles where
    the CPU has them, 1 row: the vector path); each output is computed by one
    thread the same way, so 1, 2 or 3 threads give the same bits."""
    from paradecode.models.quant import pack_f32, pack_int4_w4a8, pack_int8_i15, pack_int8_panels, quantize_int8

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(1000, 576, generator=g) * 0.05, torch.randn(5, 576, generator=g)
    f32, int4, int8 = pack_f32(w), pack_int4_w4a8(w), pack_int8_panels(quantize_int8(w))
    i15 = pack_int8_i15(quantize_int8(w))
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append((kernels.f32_mm(x, f32), kernels.int4_mm(x, int4), kernels.i8_mm(x, int8, torch.float32),
                         kernels.i8_i15_mm(x, i15, torch.float32), kernels.i8_i15_mm(x[:1], i15, torch.float32)))
    finally:
        torch.set_num_threads(before)
    for got in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, outs[0]))
    version = subprocess.run([kernels.compiler(), "--version"], capture_output=True, text=True).stdout
    if "Free Software Foundation" in version:                       # GCC has OpenMP: the build must use it
        assert kernels.threaded()


def test_attention_has_the_same_bits_on_any_thread_count(fn):
    """Attention deals (token, kv head) pairs out to threads, each computed alone: 1, 2 or 3 threads agree."""
    g = torch.Generator().manual_seed(5)
    B, T, Hkv, G, D, S = 2, 3, 3, 3, 64, 300
    qk = torch.randn(B, T, Hkv * G + Hkv, D, generator=g)
    slots = -(-S // 64) * 64
    kt, v = _stored(torch.randn(B, Hkv, D, slots, generator=g), torch.randn(B, Hkv, slots, D, generator=g),
                    "bfloat16", True)                       # the engine's cache
    allow = torch.rand(B, T, S, generator=g) < 0.8
    before = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            out = torch.empty(B, T, Hkv * G, D)
            kernels.attend(fn, qk, kt, v, allow, out, G, 0.125, S)
            outs.append(out)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def _bf16_pairs_reference(x: torch.Tensor, w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``bf16.c``'s definition in float32 steps: x and w rounded to bfloat16 (K padded to even with a zero), per
    block of 64 inputs and per pair of inputs 2p, 2p + 1 in order, acc = (acc + x[2p+1] w[2p+1]) + x[2p] w[2p]
    (each product exact in float32, each add rounded), the blocks' sums then added in order."""
    M, K = x.shape
    K2 = -(-K // 2)
    xb = torch.zeros(M, 2 * K2)
    xb[:, :K] = x.to(torch.bfloat16).float()
    wb = torch.zeros(w.shape[0], 2 * K2)
    wb[:, :K] = w.to(torch.bfloat16).float()
    total = None
    for p0 in range(0, K2, block // 2):
        acc = torch.zeros(M, w.shape[0])
        for p in range(p0, min(K2, p0 + block // 2)):
            acc = acc + xb[:, 2 * p + 1, None] * wb[None, :, 2 * p + 1]
            acc = acc + xb[:, 2 * p, None] * wb[None, :, 2 * p]
        total = acc if total is None else total + acc
    return total


@settings(max_examples=20, deadline=None)
@given(M=st.integers(1, 19), N=st.integers(1, 70), K=st.integers(1, 90), kind=st.sampled_from(["float32", "bfloat16"]),
       seed=st.integers(0, 1000))
def test_bf16_kernel_computes_its_definition(lib, M, N, K, kind, seed):
    """Any shape (odd K, partial panels and panel groups, row blocks of every size): the bits of the pair sums
    vdpbf16ps defines, float32 activations rounded to bfloat16 first; bfloat16 outputs are those rounded. On
    the engine's build (vdpbf16ps where the CPU has AVX-512 BF16) and in plain C."""
    from paradecode.models.quant import pack_bf16_panels

    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g).to(getattr(torch, kind))
    packed = pack_bf16_panels(w, float_out=True)
    y = kernels.bf16_mm(x, packed, torch.float32, lib)
    ref = x.to(torch.bfloat16).double() @ w.to(torch.bfloat16).double().T
    assert y.shape == (M, N)
    if _takes_bf16_tiles(lib, K):
        _within_float_sums(y, x, w)
        assert torch.equal(kernels.bf16_mm(x, packed, torch.bfloat16, lib), y.to(torch.bfloat16))
    else:
        want = _bf16_pairs_reference(x.float(), w)
        assert torch.equal(y, want)
        assert torch.equal(kernels.bf16_mm(x, packed, torch.bfloat16, lib), want.to(torch.bfloat16))
    assert float((y.double() - ref).abs().max()) <= 1e-5 * K * max(1.0, float(ref.abs().max()))


def _takes_bf16_tiles(lib, K: int) -> bool:
    """Whether ``lib`` multiplies bfloat16 weights of K inputs on AMX tiles (whole tile steps of 32 inputs)."""
    return bool(lib.pd_bf16_amx()) and -(-K // 2) % 16 == 0


def _within_float_sums(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """AMX tiles sum in an order of their own, which no emulation here reproduces bit for bit: check ``y``
    against the exact products of the bfloat16 operands within what float32 sums in any order can be off by,
    γ_K Σ|x||w| (and denormal products, which the tiles flush, below 2^-100 each)."""
    xb, wb = x.to(torch.bfloat16).double(), w.to(torch.bfloat16).double()
    K = x.shape[1]
    gamma = (K + 2) * 2.0 ** -24 / (1 - (K + 2) * 2.0 ** -24)
    bound = gamma * (xb.abs() @ wb.abs().T) + K * 2.0 ** -100
    assert bool(((y[:, :w.shape[0]].double() - xb @ wb.T).abs() <= bound).all())


def test_bf16_kernel_rows_threads_and_paths_agree_bit_for_bit(lib, tmp_path):
    """An output's bits depend on its row and channel only: alone or with up to 18 other rows (vdpbf16ps: blocks
    of 4 rows x 4 panels up to 4 rows, 8 rows x 2 panels above; AMX: tiles of up to 16 rows x 4 panels), on 1,
    2 or 3 threads. The vector paths have the same bits: vdpbf16ps (where the CPU has AVX-512 BF16), AVX2 +
    FMA, plain C; AMX tiles (where the CPU has them) bits of their own, every call the same."""
    from paradecode.models.quant import pack_bf16_panels

    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(1000, 576, generator=g) * 0.05, torch.randn(19, 576, generator=g).to(torch.bfloat16)
    packed = pack_bf16_panels(w)
    whole = kernels.bf16_mm(x, packed, torch.float32, lib)
    code = ("from paradecode.models.quant import pack_bf16_panels;"
            "g = torch.Generator().manual_seed(4); w = torch.randn(1000, 576, generator=g) * 0.05;"
            "x = torch.randn(19, 576, generator=g).to(torch.bfloat16);"
            "y = kernels.bf16_mm(x, pack_bf16_panels(w), torch.float32)")
    # the engine's build without tiles: vdpbf16ps where the CPU has AVX-512 BF16
    vector = _without_avx512(tmp_path, code, "PARADECODE_NO_AMX") if kernels.bf16_amx() \
        else kernels.bf16_mm(x, packed, torch.float32)
    assert torch.equal(vector[:3, :40], _bf16_pairs_reference(x[:3].float(), w[:40]))
    assert torch.equal(_without_avx512(tmp_path, code), vector)                 # AVX2 + FMA
    if _takes_bf16_tiles(lib, 576):
        _within_float_sums(whole, x, w)
    else:
        assert torch.equal(whole, vector)                                        # plain C (the portable build)
    for r in range(19):
        assert torch.equal(kernels.bf16_mm(x[r:r + 1], packed, torch.float32, lib), whole[r:r + 1]), r
    for n in (2, 3, 4, 5, 8, 9, 16):
        assert torch.equal(kernels.bf16_mm(x[:n], packed, torch.float32, lib), whole[:n]), n
    before = torch.get_num_threads()
    try:
        for nt in (2, 3):
            torch.set_num_threads(nt)
            assert torch.equal(kernels.bf16_mm(x, packed, torch.float32, lib), whole), nt
            assert torch.equal(kernels.bf16_mm(x[:1], packed, torch.float32, lib), whole[:1]), nt
    finally:
        torch.set_num_threads(before)


def test_bf16_panels_hold_the_matrix():
    """The packing rounds to bfloat16 and reorders: the rounded matrix and its rows come back exactly, and the
    first 16 n channels are a view of the first n panels (a draft vocabulary's head)."""
    from paradecode.models.quant import first_channels, pack_bf16_panels

    w = torch.randn(37, 25)
    w[3, 4] = 1e-39                                    # a denormal: zero, as vdpbf16ps reads it
    packed = pack_bf16_panels(w)
    assert packed.rows(torch.tensor([3]))[0, 4] == 0
    w[3, 4] = 0
    assert packed.shape == (37, 25) and packed.padded == 48 and packed.nbytes() == 48 * 26 * 2
    assert torch.equal(packed.dequantize(torch.bfloat16), w.to(torch.bfloat16))
    ids = torch.tensor([[0, 36, 17], [16, 15, 1]])
    assert torch.equal(packed.rows(ids), w.to(torch.bfloat16).float()[ids])
    head = first_channels(packed, 32)
    assert head.shape == (32, 25) and head.panels.data_ptr() == packed.panels.data_ptr()
    assert torch.equal(head.dequantize(), w[:32].to(torch.bfloat16).float())


def test_an_unwritable_cache_builds_the_kernels_in_the_temp_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(kernels, "cache_root", lambda: blocker / "paradecode")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = kernels.build(kernels.compiler(), ("-mno-avx2", "-mno-fma"))
    assert path.parent == tmp_path / "tmp" / f"paradecode-kernels-{os.getuid()}"
    assert kernels.load_library(path).pd_attend is not None
    assert kernels.build(kernels.compiler(), ("-mno-avx2", "-mno-fma")) == path      # built once, then found
