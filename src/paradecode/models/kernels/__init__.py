"""Small C kernels for the native engine, compiled once per machine and loaded with ctypes.

* :func:`attend` (``attention.c``): attention of a short block of new tokens against the KV cache,
  whose every output row has the same bits whatever shares its call (``attention.c`` says how);
* :func:`int4_mm` (``int4.c``): products with the int4 format's weights and int8-quantized activations
  (exact integer dot products), one read of the weights for every row of a call; its A16 variant (float16
  scales, activations in two int8 levels) for quantspec's ``draft_activations=16`` twin;
* :func:`i8_i15_mm` (``int8.c``): products with the int8 format's weights and activations scaled to
  15-bit integers (exact integer dot products; AMX tiles where the CPU has them, so that a call over 16
  rows costs about one row's);
* :func:`f32_mm`, :func:`i8_mm` (``panels.c``): products with the float32 format's weights and with
  int8 weights and per-channel scales (the int8 format's matrices and the int4 format's LM head where the
  layer widths are not multiples of 4), every output the same block sums of fused multiply-adds (bits
  independent of the call and of the instruction set), the weights streamed once per call;
* :func:`bf16_mm` (``bf16.c``): products with the bfloat16 format's weights in pair panels, every output's bits
  independent of what shares its call: AMX tiles where the CPU has them (sums of their own), else the pair sums
  ``vdpbf16ps`` defines, by that instruction where the CPU has AVX-512 BF16, with AVX2 + FMA or plain C
  elsewhere;
* :class:`LayerGlue` (``layer.c``): what a decoder layer does between its four projections, in
  three calls instead of ~25 PyTorch ops (residual add + RMSNorm + cast; RoPE + cache write +
  attention + cast; SiLU-and-multiply + cast), every row again computed alone;
* :class:`LayerStack` (``stack.c``): a forward's layers, products and glue, in one call when every
  matrix has a compiled format (the same functions in the same order as the per-layer calls: the same
  bits, without ~7 ctypes calls per layer).

The sources are compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) for the
host CPU (``-march=native``; on x86 without AVX-512, so that every machine runs the AVX2 path; the
int4 and panel kernels add AVX-512 paths of their own, chosen at run time, with the AVX2 paths' bits) into
``<cache>/kernels/``, keyed by the source, the compiler and the CPU; a later process loads the library
directly. With OpenMP (``-fopenmp``, where the compiler has it) the int4 and panel products deal
their output channels (attention: its (token, kv head) pairs) out to PyTorch's thread count (``torch.get_num_threads()``, the CLI's
``--threads``) on the OpenMP runtime PyTorch itself loaded; each output is still computed by one
thread, the same way, so the bits do not depend on the thread count. Where no compiler works, :func:`attention_kernel` returns None and the engine keeps its
PyTorch paths (attention, layer ops, int4 x bfloat16 products, MKL's float32 GEMM; ``docs/engine.md``).
``PARADECODE_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..loading import cache_root

_HERE = Path(__file__).parent
_SOURCES = (_HERE / "attention.c", _HERE / "layer.c", _HERE / "int4.c", _HERE / "int8.c", _HERE / "panels.c",
            _HERE / "bf16.c", _HERE / "stack.c")
_HEADERS = (_HERE / "simd.h",)
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None | bool = False      # False: not tried yet; None: unavailable
FAILURE: str | None = None                    # why the kernel is unavailable, when it is


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_key() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name", "Features")):
                flags += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return f"{platform.machine()}:{flags}"


def build(cc: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the kernels (once per source, compiler, CPU and flags) into one library and return its path.
    ``extra_flags`` go after the defaults (the tests build the portable path with ``-mno-avx2``)."""
    src = b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = ["-O2", "-march=native", "-fPIC", "-shared", "-fno-fast-math"]
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386"):
        flags.append("-mno-avx512f")    # one vector path (AVX2 + FMA), the one tested here
    flags += extra_flags
    key = hashlib.sha1(src + version.encode() + _cpu_key().encode() + " ".join(flags).encode()).hexdigest()[:16]
    name = f"paradecode-{key}.so"
    dirs = _build_dirs()
    for where in dirs:
        if (where / name).is_file():
            return where / name
    for where in dirs:                # the cache, else (not writable) a directory of this user's in the temp dir
        try:
            where.mkdir(parents=True, exist_ok=True)
            # build next to the target and rename: concurrent processes never load a half-written library
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=where)
            break
        except OSError:
            continue
    else:
        raise OSError(f"no writable directory to build them in ({', '.join(map(str, dirs))})")
    out = where / name
    os.close(fd)
    try:
        # OpenMP (the products' threads) where the compiler has it: the library then needs libgomp.so.1,
        # which PyTorch has loaded already, so the process keeps one OpenMP runtime and thread pool
        for omp in (["-fopenmp"], []):
            done = subprocess.run([cc, *flags, *omp, "-o", tmp, *map(str, _SOURCES), "-lm"], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode == 0:
                break
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _build_dirs() -> list[Path]:
    return [cache_root() / "kernels", Path(tempfile.gettempdir()) / f"paradecode-kernels-{os.getuid()}"]


def _load() -> ctypes.CDLL | None:
    global _LIB, FAILURE
    if _LIB is not False:                  # known: no lock on the hot path (every int4 product asks)
        return _LIB
    with _LOCK:
        if _LIB is not False:
            return _LIB
        _LIB = None
        if os.environ.get("PARADECODE_KERNELS", "1") == "0":
            FAILURE = "turned off by PARADECODE_KERNELS=0"
            return None
        cc = _compiler()
        if cc is None:
            FAILURE = "no C compiler found (set CC)"
            return None
        try:
            lib = load_library(build(cc))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            FAILURE = f"could not build the attention kernel: {e}"
            return None
        _LIB = lib
        return lib


def load_library(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' signatures."""
    lib = ctypes.CDLL(str(path))
    p, L, I, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    lib.pd_attend.argtypes = [p, p, L, L, L, L, p, L, L, L, I, p, p, I, I, I, I, I, I, F, I]
    lib.pd_attend.restype = I
    lib.pd_add_rmsnorm.argtypes = [p, p, I, L, L, I, p, F, p, I]
    lib.pd_add_rmsnorm.restype = None
    lib.pd_silu_mul.argtypes = [p, I, L, L, I, p]
    lib.pd_silu_mul.restype = None
    lib.pd_rope_attend.argtypes = [p, I, L, p, p, p, L, L, L, L, p, L, L, L, I, p, p, p, p, I, I, I, I, I, I, I, F,
                                   I]
    lib.pd_rope_attend.restype = I
    lib.pd_int4_mm.argtypes = [p, I, L, I, I, p, I, p, I, L, I]
    lib.pd_int4_mm.restype = I
    lib.pd_int4_a16_mm.argtypes = [p, I, L, I, I, p, I, p, I, L, I]
    lib.pd_int4_a16_mm.restype = I
    lib.pd_f32_mm.argtypes = [p, I, L, I, I, p, I, p, I, L, I]
    lib.pd_f32_mm.restype = I
    lib.pd_i8_mm.argtypes = [p, I, L, I, I, p, p, I, p, I, L, I]
    lib.pd_i8_mm.restype = I
    lib.pd_i8_i15_mm.argtypes = [p, I, L, I, I, p, p, I, p, I, L, I]
    lib.pd_i8_i15_mm.restype = I
    lib.pd_bf16_mm.argtypes = [p, I, L, I, I, p, I, p, I, L, I]
    lib.pd_bf16_mm.restype = I
    lib.pd_layers.argtypes = [p, p, I, p, p, p, p, p, I, p, p, p, p, p, p, p, p, p, L, L, L, L, L, p, L, L, L, L,
                              I, p, I, I, I, I, I, I, I, I, F, F, I]
    lib.pd_layers.restype = I
    lib.pd_layer_products.argtypes = [p, p, I, p, p, p, I, p, p, p, p, I, I, I, I, I]
    lib.pd_layer_products.restype = I
    lib.pd_amx.argtypes = []
    lib.pd_amx.restype = I
    lib.pd_bf16_amx.argtypes = []
    lib.pd_bf16_amx.restype = I
    lib.pd_vector_isa.argtypes = []
    lib.pd_vector_isa.restype = I
    lib.pd_openmp.argtypes = []
    lib.pd_openmp.restype = I
    return lib


def threaded() -> bool:
    """Whether the products can use several threads (the kernels were built with OpenMP)."""
    lib = _load()
    return lib is not None and bool(lib.pd_openmp())


def amx() -> bool:
    """Whether the int8 products of this process take AMX tiles for blocks of rows (``int8.c``;
    ``PARADECODE_NO_AMX=1``: no)."""
    lib = _load()
    return lib is not None and bool(lib.pd_amx())


def bf16_amx() -> bool:
    """Whether the bfloat16 products of this process take AMX tiles (``bf16.c``; ``PARADECODE_NO_AMX=1``: no)."""
    lib = _load()
    return lib is not None and bool(lib.pd_bf16_amx())


def describe() -> str:
    """Which paths the compiled products take in this process, in a few words (benchmark reports name it)."""
    if _load() is None:
        return f"unavailable ({FAILURE}): PyTorch's products"
    tiles = [fmt for fmt, on in (("bfloat16", bf16_amx()), ("int8", amx())) if on]
    vector = ("plain C", "AVX2", "AVX-512", "AVX-512 BF16")[_load().pd_vector_isa()]
    return f"AMX tiles for {' and '.join(tiles)}, {vector} elsewhere" if tiles else f"{vector}, no AMX"


def compiler() -> str | None:
    """The C compiler the kernels are built with, or None."""
    return _compiler()


def attention_kernel():
    """The compiled ``pd_attend`` function, or None where it cannot be built (see ``FAILURE``)."""
    lib = _load()
    return None if lib is None else lib.pd_attend


def attend(fn, qk: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, allow: torch.Tensor | None,
           out: torch.Tensor, G: int, scale: float, S: int) -> None:
    """Run ``pd_attend`` over the first S slots: queries and new keys ``qk`` (B, T, Hq + Hkv, D) float32
    contiguous, the cache's keys ``kt`` (see :func:`key_strides`) and values ``v`` (B, Hkv, slots, D)
    of one layer (float32 or bfloat16, both the same), ``allow`` (B, T, S) bool or None (every slot below
    S), into ``out`` (B, T, Hq, D) float32. The key storage must hold S rounded up to a multiple of 64
    slots (the cache's does)."""
    B, T, _, D = qk.shape
    Hkv = kt.shape[1]
    vs = v.stride()
    rc = fn(qk.data_ptr(), kt.data_ptr(), *key_strides(kt), v.data_ptr(), vs[0], vs[1], vs[2], _kv_kind(kt, v),
            None if allow is None else allow.data_ptr(), out.data_ptr(), B, T, Hkv, G, D, S, scale,
            torch.get_num_threads())
    if rc != 0:
        raise MemoryError("the attention kernel could not allocate its scratch memory")


_KIND = {torch.float32: 1, torch.bfloat16: 2}      # layer.c's activation types


KEY_BLOCK = 16      # slots per block of the blocked key layout (simd.h's PD_KEY_BLOCK)


def key_strides(kt: torch.Tensor) -> tuple[int, int, int, int]:
    """``(kb, kh, ldk, kbs)`` of one layer's keys for ``attention.c`` (simd.h's ``pd_key_at``). float32: kt
    (B, Hkv, D, slots), transposed, or (B, Hkv, slots / 16, D, 16), blocked (each block of 16 slots one
    contiguous (D, 16) tile); bfloat16: (B, Hkv, slots / 16, D / 2, 16, 2), blocked with the dimensions in
    pairs (each block one (D / 2, 16, 2) tile, AMX's layout for a bfloat16 tile product)."""
    st = kt.stride()
    if kt.dtype == torch.bfloat16:
        if kt.dim() != 6 or kt.shape[4:] != (KEY_BLOCK, 2) or st[5] != 1 or st[4] != 2 or st[3] != 2 * KEY_BLOCK:
            raise ValueError(f"bfloat16 keys of shape {tuple(kt.shape)}: expected (B, Hkv, slots/16, D/2, 16, 2)")
        return st[0], st[1], st[3], st[2]
    if kt.dim() == 4:
        if st[3] != 1:
            raise ValueError("transposed keys need unit slot stride")
        return st[0], st[1], st[2], KEY_BLOCK
    if kt.dim() != 5 or kt.shape[4] != KEY_BLOCK or st[4] != 1 or st[3] != KEY_BLOCK:
        raise ValueError(f"keys of shape {tuple(kt.shape)}: expected (B, Hkv, D, slots) or (B, Hkv, slots/16, D, 16)")
    return st[0], st[1], st[3], st[2]


def _kv_kind(k: torch.Tensor, v: torch.Tensor) -> int:
    """The kernels' kind of a KV cache's elements (float32 or bfloat16, keys and values alike)."""
    if k.dtype != v.dtype or k.dtype not in _KIND:
        raise ValueError(f"a KV cache of {k.dtype} keys and {v.dtype} values: the kernels take float32 or "
                         "bfloat16, the same for both")
    return _KIND[k.dtype]


class LayerGlue:
    """``layer.c``'s three calls on tensors. Activations are float32 or bfloat16 with unit column stride;
    ``x`` and the outputs are contiguous. Every row is computed alone (its bits do not depend on the call)."""

    def __init__(self, lib: ctypes.CDLL):
        self._norm, self._silu, self._rope = lib.pd_add_rmsnorm, lib.pd_silu_mul, lib.pd_rope_attend

    def add_rmsnorm(self, x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float,
                    out: torch.Tensor) -> None:
        """``x += delta`` (in place; None: no add), then ``out = rmsnorm(x) * w``: x (R, H) float32, delta
        (R, H), w (H,) float32, out (R, H) float32 or bfloat16."""
        R, H = x.shape
        if delta is None:
            self._norm(x.data_ptr(), None, 0, 0, R, H, w.data_ptr(), eps, out.data_ptr(), _KIND[out.dtype])
        else:
            self._norm(x.data_ptr(), delta.data_ptr(), _KIND[delta.dtype], delta.stride(0), R, H, w.data_ptr(), eps,
                       out.data_ptr(), _KIND[out.dtype])

    def silu_mul(self, gu: torch.Tensor, out: torch.Tensor) -> None:
        """``out = silu(gate) * up`` for gu (R, 2I) = [gate | up], out (R, I) of gu's dtype."""
        R, I = out.shape
        self._silu(gu.data_ptr(), _KIND[gu.dtype], gu.stride(0), R, I, out.data_ptr())

    def rope_attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kt: torch.Tensor,
                    v: torch.Tensor, allow: torch.Tensor | None, qk: torch.Tensor, att: torch.Tensor,
                    out: torch.Tensor, G: int, L0: int, scale: float) -> None:
        """One layer's attention for B sequences of T new tokens: RoPE on the queries and keys of qkv
        (B*T, (Hq + 2 Hkv) * D) with cos, sin (B*T, D) float32, the keys and values into this layer's cache
        kt (:func:`key_strides`), v (B, Hkv, slots, D) (float32, or bfloat16: rounded to nearest even) at
        slots L0.., attention as :func:`attend` with
        ``allow`` (B, T, L0 + T) bool or None. Scratch: qk (B*T, Hq + Hkv, D) float32; the output goes to
        att (B*T, Hq*D) float32 and, cast, to the first B*T rows of out (bfloat16; float32: out's rows are att)."""
        B, Hkv, D = v.shape[0], v.shape[1], v.shape[3]
        T = qk.shape[0] // B
        vs = v.stride()
        rc = self._rope(qkv.data_ptr(), _KIND[qkv.dtype], qkv.stride(0), cos.data_ptr(), sin.data_ptr(),
                        kt.data_ptr(), *key_strides(kt), v.data_ptr(), vs[0], vs[1], vs[2], _kv_kind(kt, v),
                        None if allow is None else allow.data_ptr(), qk.data_ptr(), att.data_ptr(), out.data_ptr(),
                        _KIND[out.dtype], B, T, Hkv, G, D, L0, scale, torch.get_num_threads())
        if rc != 0:
            raise MemoryError("the attention kernel could not allocate its scratch memory")


class _Mat(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int), ("out_kind", ctypes.c_int),
                ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Mat), ("o", _Mat), ("gu", _Mat), ("down", _Mat), ("ln1", ctypes.c_void_p),
                ("ln2", ctypes.c_void_p)]


def _mat(w, act: torch.dtype) -> _Mat | None:
    """``stack.c``'s record of a matrix whose product outputs ``act``, or None if it has no compiled format."""
    from ..quant import BF16PanelWeight, F32PanelWeight, Int4W4A8Weight, Int4W4A16Weight, Int8I15Weight, Int8PanelWeight

    if isinstance(w, Int8I15Weight) and not w.float_out:
        return _Mat(1, w.padded, w.shape[1], _KIND[act], w.panels.data_ptr(), w.scale.data_ptr())
    if isinstance(w, Int8PanelWeight) and not w.float_out:
        return _Mat(2, w.padded, w.shape[1], _KIND[act], w.panels.data_ptr(), w.scale.data_ptr())
    if isinstance(w, F32PanelWeight) and act == torch.float32:
        return _Mat(3, w.padded, w.shape[1], 1, w.panels.data_ptr(), None)
    if isinstance(w, Int4W4A8Weight) and act == torch.bfloat16:
        return _Mat(6 if isinstance(w, Int4W4A16Weight) else 4, w.padded, w.shape[1], 2, w.blocks.data_ptr(), None)
    if isinstance(w, BF16PanelWeight) and not w.float_out:
        return _Mat(5, w.padded, w.shape[1], _KIND[act], w.panels.data_ptr(), None)
    return None


class LayerStack:
    """A model's decoder layers for ``stack.c``'s ``pd_layers``: a forward's layers in one call. Every product
    and glue step is the function the per-layer calls run (``LayerGlue``, :func:`i8_i15_mm`, :func:`int4_mm`,
    :func:`f32_mm`, :func:`i8_mm`), in the same order on the same kinds of buffers, so the bits are theirs.
    Build it with :meth:`build`, which returns None unless every layer matrix has a compiled format whose
    output is the activations' dtype (bfloat16 or float32 projections through PyTorch, biases: no)."""

    def __init__(self, lib: ctypes.CDLL, table, widths: tuple[int, int, int, int], act: torch.dtype,
                 keep: tuple):
        self._fn, self._products, self._table, self.act = lib.pd_layers, lib.pd_layer_products, table, act
        self.widths = widths           # padded output widths of qkv, o, gate/up, down
        self._keep = keep              # the tensors the table points into

    @classmethod
    def build(cls, wqkv, wo, wgu, wdown, ln1, ln2, act: torch.dtype) -> "LayerStack | None":
        lib = _load()
        if lib is None or act not in _KIND:
            return None
        table = (_Layer * len(wqkv))()
        for i, ws in enumerate(zip(wqkv, wo, wgu, wdown)):
            mats = [_mat(w, act) for w in ws]
            if any(m is None for m in mats):
                return None
            table[i] = _Layer(*mats, ln1[i].data_ptr(), ln2[i].data_ptr())
        widths = tuple(ws[0].padded for ws in (wqkv, wo, wgu, wdown))
        if any(w.padded != widths[j] for j, ws in enumerate((wqkv, wo, wgu, wdown)) for w in ws):
            return None                # the output buffers are shared by the layers
        return cls(lib, table, widths, act, (wqkv, wo, wgu, wdown, ln1, ln2))

    def run(self, order: tuple[int, ...], final_norm: torch.Tensor, x: torch.Tensor, h: torch.Tensor,
            a: torch.Tensor, m: torch.Tensor, qk: torch.Tensor, att: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allow: torch.Tensor | None, B: int, T: int,
            G: int, L0: int, scale: float, eps: float) -> None:
        """The layers ``order`` over x (B*T, H) float32 in place, then h = the norm after the last one (the
        next layer's ln1, or ``final_norm``): h (B*T, H), a (B*T, Hq*D), m (B*T, I) of the activations' dtype;
        qk, att, cos, sin as :meth:`LayerGlue.rope_attend`; k (layers, ...) and v (layers, B, Hkv, slots, D)
        the whole cache (float32 or bfloat16; each layer's keys as :func:`key_strides` takes them)."""
        R, H = x.shape
        ys = [torch.empty(R, w, dtype=self.act) for w in self.widths]
        vs = v.stride()
        order_arr = (ctypes.c_int * len(order))(*order)
        rc = self._fn(ctypes.addressof(self._table), ctypes.addressof(order_arr), len(order), final_norm.data_ptr(),
                      x.data_ptr(), h.data_ptr(), a.data_ptr(), m.data_ptr(), _KIND[self.act],
                      *(y.data_ptr() for y in ys), qk.data_ptr(), att.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                      k.data_ptr(), k.stride(0), *key_strides(k[0]),
                      v.data_ptr(), vs[0], vs[1], vs[2], vs[3], _kv_kind(k, v),
                      None if allow is None else allow.data_ptr(), B, T, v.shape[2], G, v.shape[4], H, m.shape[1],
                      L0, scale, eps, torch.get_num_threads())
        _check(rc)

    def products(self, order: tuple[int, ...], h: torch.Tensor, a: torch.Tensor, m: torch.Tensor) -> None:
        """Only the four products of each layer in ``order``, as :meth:`run` calls them, on the inputs h (R, H),
        a (R, Hq*D), m (R, I): a forward's bare products (``benchmarks/engine.py``)."""
        R = h.shape[0]
        ys = [torch.empty(R, w, dtype=self.act) for w in self.widths]
        order_arr = (ctypes.c_int * len(order))(*order)
        _check(self._products(ctypes.addressof(self._table), ctypes.addressof(order_arr), len(order), h.data_ptr(),
                              a.data_ptr(), m.data_ptr(), _KIND[self.act], *(y.data_ptr() for y in ys), R,
                              h.shape[1], a.shape[1], m.shape[1], torch.get_num_threads()))


def _check(rc: int) -> None:
    if rc == -2:
        raise RuntimeError("stack.c: a matrix of unknown kind")
    if rc:
        raise MemoryError("the layer kernels could not allocate their scratch memory")


def layer_glue() -> LayerGlue | None:
    """The compiled layer glue, or None where the kernels cannot be built (see ``FAILURE``)."""
    lib = _load()
    return None if lib is None else LayerGlue(lib)


def int4_mm(x: torch.Tensor, w, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``x`` (M, K) bfloat16 or float32 with unit column stride, times a
    :class:`~paradecode.models.quant.Int4W4A8Weight` (or its A16 variant,
    :class:`~paradecode.models.quant.Int4W4A16Weight`): (M, N) bfloat16. ``lib``: another build (tests)."""
    from ..quant import Int4W4A16Weight

    lib = lib or _load()
    if lib is None:
        raise RuntimeError(f"the int4 kernel is unavailable: {FAILURE}")
    M, K = x.shape
    y = torch.empty(M, w.padded, dtype=torch.bfloat16)
    fn = lib.pd_int4_a16_mm if isinstance(w, Int4W4A16Weight) else lib.pd_int4_mm
    if fn(x.data_ptr(), _KIND[x.dtype], x.stride(0), M, K, w.blocks.data_ptr(), w.padded, y.data_ptr(), 2,
          y.stride(0), torch.get_num_threads()):
        raise MemoryError("the int4 kernel could not allocate its scratch memory")
    return y if w.padded == w.n else y[:, :w.n]


def f32_mm(x: torch.Tensor, w, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``x`` (M, K) float32 or bfloat16 with unit column stride, times a
    :class:`~paradecode.models.quant.F32PanelWeight`: (M, N) float32. ``lib``: another build (tests)."""
    return _panel_mm(x, w, torch.float32, lib)


def i8_mm(x: torch.Tensor, w, out_dtype: torch.dtype, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``x`` (M, K) float32 or bfloat16 with unit column stride, times a
    :class:`~paradecode.models.quant.Int8PanelWeight`: (M, N) in ``out_dtype`` (float32 or bfloat16)."""
    return _panel_mm(x, w, out_dtype, lib)


def i8_i15_mm(x: torch.Tensor, w, out_dtype: torch.dtype, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``x`` (M, K) float32 or bfloat16 with unit column stride, times a
    :class:`~paradecode.models.quant.Int8I15Weight` (15-bit integer activations, ``int8.c``): (M, N) in
    ``out_dtype`` (float32 or bfloat16)."""
    return _panel_mm(x, w, out_dtype, lib)


def bf16_mm(x: torch.Tensor, w, out_dtype: torch.dtype, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``x`` (M, K) bfloat16 or float32 (rounded to bfloat16) with unit column stride, times a
    :class:`~paradecode.models.quant.BF16PanelWeight` (``bf16.c``): (M, N) in ``out_dtype`` (float32 or
    bfloat16). ``lib``: another build (tests)."""
    return _panel_mm(x, w, out_dtype, lib)


def _panel_mm(x: torch.Tensor, w, out_dtype: torch.dtype, lib: ctypes.CDLL | None) -> torch.Tensor:
    lib = lib or _load()
    if lib is None:
        raise RuntimeError(f"the panel kernels are unavailable: {FAILURE}")
    M, K = x.shape
    if x.stride(1) != 1:
        raise ValueError("the panel kernels take rows with unit column stride")
    y = torch.empty(M, w.padded, dtype=out_dtype)
    args = (x.data_ptr(), _KIND[x.dtype], x.stride(0), M, K, w.panels.data_ptr())
    tail = (w.padded, y.data_ptr(), _KIND[out_dtype], y.stride(0), torch.get_num_threads())
    if w.panels.dtype == torch.float32:
        rc = lib.pd_f32_mm(*args, *tail)
    elif w.panels.dtype == torch.bfloat16:
        rc = lib.pd_bf16_mm(*args, *tail)
    else:                 # int8 panels (Int8PanelWeight) or the int8 kernel's u8 panels (Int8I15Weight)
        fn = lib.pd_i8_mm if w.panels.dtype == torch.int8 else lib.pd_i8_i15_mm
        rc = fn(*args, w.scale.data_ptr(), *tail)
    if rc:
        raise MemoryError("the panel kernel could not allocate its scratch memory")
    return y if w.padded == w.n else y[:, :w.n]
