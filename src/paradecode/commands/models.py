"""`paradecode models`: the default model, where it is cached, its size, and what this CPU runs it with."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("models", help="show the default model and its cache")
    p.add_argument("--prepare", action="store_true",
                   help="convert the default model now and prepare its default format's weights (one time)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models import kernels, prepared
    from ..models.loading import BACKENDS, auto_dtype, cache_root, default_model_report, load_model, \
        resolve_model_path
    from ..models.native import DTYPES, SUPPORTED_ARCHITECTURES

    if args.prepare:
        resolve_model_path(None)
        load_model(None)           # the default format's prepared weights (models/prepared.py), written once
    info = default_model_report()
    kept = sorted(prepared.directory().glob("*.safetensors")) if prepared.directory().is_dir() else []
    info.update(cache_root=str(cache_root()), backends=list(BACKENDS), dtypes=list(DTYPES),
                native_architectures=list(SUPPORTED_ARCHITECTURES), prepared_dir=str(prepared.directory()),
                prepared_files=len(kept), prepared_bytes=sum(f.stat().st_size for f in kept),
                auto_dtype=auto_dtype(), kernels=kernels.describe())
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"default model: {info['name']} ({info['license']}, from pip package {info['package']})")
    if not info["installed"]:
        print(f"  not installed — {info['hint']}")
    else:
        print(f"  GGUF file:   {info['gguf']} ({info['gguf_bytes'] / 1e6:.1f} MB)")
        state = f"{info['cache_bytes'] / 1e6:.1f} MB" if info["converted"] else \
            "not converted yet (happens on first use, or run `paradecode models --prepare`)"
        print(f"  cached at:   {info['cache_dir']} ({state})")
    print(f"prepared weights: {info['prepared_files']} model format(s) in {info['prepared_dir']} "
          f"({info['prepared_bytes'] / 1e6:.1f} MB; built on a format's first load, safe to delete)")
    print(f"backends: {', '.join(info['backends'])}; dtypes: {', '.join(info['dtypes'])} "
          f"(auto here: {info['auto_dtype']})")
    print(f"kernels on this CPU: {info['kernels']}")
    print(f"native architectures: {', '.join(info['native_architectures'])} (others: --backend transformers)")
    print("other models: --model PATH with a local Hugging Face directory or a .gguf file")
    return 0
