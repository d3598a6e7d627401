"""Small C kernels for the native engine, compiled once per machine and loaded with ctypes.

One kernel so far: :func:`attend`, attention of a short block of new tokens against the KV cache
whose every output row has the same bits whatever shares its call (``attention.c`` says how).
The source is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) for the
host CPU (``-march=native``; on x86 without AVX-512, so that every machine runs the AVX2 path) into ``<cache>/kernels/``, keyed by the source, the compiler and the CPU; a
later process loads the library directly. Where no compiler works, :func:`attention_kernel`
returns None and the engine keeps its PyTorch attention path (``docs/engine.md``).
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

_SOURCE = Path(__file__).with_name("attention.c")
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
    """Compile ``attention.c`` (once per source, compiler, CPU and flags) and return the library's path.
    ``extra_flags`` go after the defaults (the tests build the portable path with ``-mno-avx2``)."""
    src = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = ["-O2", "-march=native", "-fPIC", "-shared", "-fno-fast-math"]
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386"):
        flags.append("-mno-avx512f")    # one vector path (AVX2 + FMA), the one tested here
    flags += extra_flags
    key = hashlib.sha1(src + version.encode() + _cpu_key().encode() + " ".join(flags).encode()).hexdigest()[:16]
    out = cache_root() / "kernels" / f"attention-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build next to the target and rename: concurrent processes never load a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> ctypes.CDLL | None:
    global _LIB, FAILURE
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
    """Load a built library and declare ``pd_attend``'s signature."""
    lib = ctypes.CDLL(str(path))
    f = lib.pd_attend
    p, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    f.argtypes = [p, p, L, L, L, p, L, L, L, p, p, I, I, I, I, I, I, ctypes.c_float]
    f.restype = I
    return lib


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
    contiguous, the cache's transposed keys ``kt`` (B, Hkv, D, slots) and values ``v`` (B, Hkv, slots, D)
    of one layer, ``allow`` (B, T, S) bool or None (every slot below S), into ``out`` (B, T, Hq, D)
    float32. The key storage must hold S rounded up to a multiple of 64 slots (the cache's does)."""
    B, T, _, D = qk.shape
    Hkv = kt.shape[1]
    ks, vs = kt.stride(), v.stride()
    rc = fn(qk.data_ptr(), kt.data_ptr(), ks[0], ks[1], ks[2], v.data_ptr(), vs[0], vs[1], vs[2],
            None if allow is None else allow.data_ptr(), out.data_ptr(), B, T, Hkv, G, D, S, scale)
    if rc != 0:
        raise MemoryError("the attention kernel could not allocate its scratch memory")

