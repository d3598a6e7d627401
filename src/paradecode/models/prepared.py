"""A disk cache of a model's prepared weights: each format's quantized and packed layouts, built once.

Loading the native engine converts every checkpoint tensor into its format (``NativeLlama._load``):
bfloat16 pair panels, int8 panels, int4 blocks, the greedy head's int8 copy and its bounds. For the
default model that is most of a load (bfloat16 ~1.1 s of 1.4 s here), and quantspec's int4 twin pays
another ~1.2 s inside the first request. The result depends only on the checkpoint's bytes, the format
and its options, the CPU (which kernels, hence which layouts) and the code that builds it, so it is kept
in ``<cache>/prepared/`` under a key of all of these and read back on later loads.

One file per model and format: a safetensors file (every tensor of the prepared weights) whose metadata
holds a manifest of how they fit together (which weight class, its scalar fields, which attribute). A
file is written to a temporary name and renamed into place, so a reader never sees half of one; a file
that cannot be read is ignored (and rebuilt). A new build of the same model and format (another code
version) replaces the older file, so stale copies do not pile up. Only checkpoints on disk are cached
(their files' paths, sizes and modification times are part of the key), never in-memory weights.
The cache holds at most ``PARADECODE_PREPARED_CACHE_MB`` (default 4096) megabytes: past that, the least
recently used files go. ``PARADECODE_PREPARED_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from .argmax_head import ArgmaxHead
from .loading import SAFETENSORS_DTYPES, cache_root, safetensors_header
from .quant import (BF16PanelWeight, F32PanelWeight, Int4W4A8Weight, Int4W4A16Weight, Int4Weight, Int8I15Weight,
                    Int8PanelWeight, Int8Weight)

log = logging.getLogger(__name__)

VERSION = 1
#: the weight classes a prepared file may hold (anything else, e.g. oneDNN's opaque prepacked tensors: not cached)
CLASSES = {c.__name__: c for c in (Int8Weight, Int4Weight, Int4W4A8Weight, Int4W4A16Weight, F32PanelWeight,
                                   BF16PanelWeight, Int8PanelWeight, Int8I15Weight, ArgmaxHead)}
# the code that decides the layouts, and the kernels that read them
_CODE = ("native.py", "quant.py", "argmax_head.py", "prepared.py", "kernels/*.c", "kernels/*.h")
_code_hash: str | None = None


class NotCacheable(Exception):
    """A value the file format does not hold."""


def enabled() -> bool:
    return os.environ.get("PARADECODE_PREPARED_CACHE", "1") != "0"


def directory() -> Path:
    return cache_root() / "prepared"


def code_hash() -> str:
    global _code_hash
    if _code_hash is None:
        h = hashlib.sha256()
        here = Path(__file__).parent
        for pattern in _CODE:
            for f in sorted(here.glob(pattern)):
                h.update(f.name.encode() + f.read_bytes())
        _code_hash = h.hexdigest()
    return _code_hash


def source_files(weights) -> list[Path] | None:
    """The files a checkpoint mapping reads its tensors from (``LazyWeights``), or None (in-memory weights)."""
    index = getattr(weights, "index", None)
    if not isinstance(index, dict) or not index:
        return None
    return sorted({entry[0] for entry in index.values()})


def cache_file(files: Iterable[Path], config: dict, options: dict) -> Path:
    """Where the prepared weights of the checkpoint ``files`` with ``config`` in the format ``options`` live.

    The name is ``<slot>-<build>.safetensors``: ``slot`` says which checkpoint, in which format (with
    which options, on which CPU); ``build`` which code, torch and file-format version built it.
    """
    ident = []
    for f in files:
        st = f.stat()
        ident.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    from .kernels import _cpu_key

    slot = _digest({"files": ident, "config": config, "options": options, "cpu": _cpu_key()})
    build = _digest({"code": code_hash(), "torch": torch.__version__, "version": VERSION})
    return directory() / f"{slot}-{build}.safetensors"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- (de)serialization -----------------------------------------------------------------------------------------
def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_mkldnn:
            raise NotCacheable(f"{name}: a {value.layout} tensor")
        tensors[name] = value.contiguous()
        return {"tensor": name}
    if isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    cls = type(value)
    if dataclasses.is_dataclass(value) and CLASSES.get(cls.__name__) is cls:
        return {"cls": cls.__name__, "fields": {f.name: _encode(getattr(value, f.name), f"{name}.{f.name}", tensors)
                                                for f in dataclasses.fields(value)}}
    raise NotCacheable(f"{name}: a {cls.__name__}")


def _decode(enc: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if enc is None:
        return None
    if "tensor" in enc:
        return tensors[enc["tensor"]]
    if "value" in enc:
        return enc["value"]
    if "list" in enc:
        return [_decode(v, tensors) for v in enc["list"]]
    return CLASSES[enc["cls"]](**{k: _decode(v, tensors) for k, v in enc["fields"].items()})


def save(path: Path, state: dict[str, Any], sources: Iterable[Path] = ()) -> bool:
    """Write ``state`` (attribute -> tensor, weight, list of them, scalar or None) to ``path``; an attribute
    that is the same object as an earlier one is stored as a reference to it. False (nothing written) when a
    value cannot be stored or the directory is not writable.

    ``sources``: the checkpoint files the weights come from. Written, the file replaces the older builds of
    its slot, and any other file whose sources are gone (a checkpoint deleted or converted again elsewhere)
    is removed too."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {}
    seen: dict[int, str] = {}
    try:
        for attr, value in state.items():
            if value is not None and id(value) in seen and not isinstance(value, (bool, int, float, str)):
                manifest[attr] = {"ref": seen[id(value)]}
                continue
            seen[id(value)] = attr
            manifest[attr] = _encode(value, attr, tensors)
    except NotCacheable as e:
        log.debug("prepared weights not cached: %s", e)
        return False
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sources = [str(Path(f).resolve()) for f in sources]
        save_file(tensors, str(tmp), metadata={"manifest": json.dumps(manifest), "version": str(VERSION),
                                               "sources": json.dumps(sources)})
        os.replace(tmp, path)
    except (OSError, RuntimeError, ValueError) as e:      # read-only or full disk; tensors sharing memory
        log.debug("prepared weights not cached at %s: %s", path, e)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False
    slot = path.name.split("-")[0]
    for other in path.parent.glob("*.safetensors"):
        if other != path and (other.name.startswith(f"{slot}-") or _orphaned(other)):
            other.unlink(missing_ok=True)
    _keep_within(path.parent, limit_bytes(), path)
    return True


def limit_bytes() -> int:
    """How much the cache may hold (``PARADECODE_PREPARED_CACHE_MB``, default 4096 MB: every format of a
    couple of models the size of the default one)."""
    try:
        return int(float(os.environ.get("PARADECODE_PREPARED_CACHE_MB", "4096")) * 1e6)
    except ValueError:
        return int(4096e6)


def _keep_within(directory: Path, limit: int, keep: Path) -> None:
    """Remove the least recently used files (a load marks its file used) until the rest fit in ``limit``
    bytes; ``keep``, just written, stays."""
    files = []
    for f in directory.glob("*.safetensors"):
        try:
            st = f.stat()
        except OSError:
            continue
        files.append((st.st_mtime_ns, st.st_size, f))
    total = sum(size for _, size, _ in files)
    for _, size, f in sorted(files, key=lambda t: t[0]):
        if total <= limit:
            break
        if f != keep:
            f.unlink(missing_ok=True)
            total -= size


def _metadata(path: Path) -> dict[str, str]:
    return safetensors_header(path)[1].get("__metadata__") or {}


def _orphaned(path: Path) -> bool:
    """Whether a prepared file's checkpoint files are gone (an unreadable file counts as orphaned)."""
    try:
        sources = json.loads(_metadata(path).get("sources", "[]"))
    except (OSError, ValueError):
        return True
    return any(not Path(f).exists() for f in sources)


def load(path: Path) -> dict[str, Any] | None:
    """What :func:`save` wrote, or None when the file is missing or unreadable.

    Each tensor is read straight into memory of its own (torch's: aligned, anonymous): no mapping of the
    file, so the load's peak memory is the weights' size, not twice it.
    """
    try:
        base, header = safetensors_header(path)
        meta = header.pop("__metadata__", None) or {}
        if meta.get("version") != str(VERSION):
            return None
        manifest = json.loads(meta["manifest"])
        tensors: dict[str, torch.Tensor] = {}
        with open(path, "rb") as fh:
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
                if end - start != t.numel() * t.element_size():
                    raise ValueError(f"{name}: {end - start} bytes for {t.numel()} elements")
                fh.seek(base + start)
                if t.numel() and fh.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - start:
                    raise ValueError(f"{name}: the file ends early")
                tensors[name] = t
        state: dict[str, Any] = {}
        for attr, enc in manifest.items():
            state[attr] = state[enc["ref"]] if isinstance(enc, dict) and "ref" in enc else _decode(enc, tensors)
        try:
            os.utime(path)                   # used now: the last to go when the cache is over its size
        except OSError:
            pass
        return state
    except FileNotFoundError:
        return None
    except Exception as e:                   # a truncated or foreign file: rebuild rather than fail the load
        log.debug("prepared weights at %s unreadable: %s", path, e)
        return None
