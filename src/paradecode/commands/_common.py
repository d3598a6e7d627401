"""Options shared by several subcommands, parsed and validated in one place."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..errors import UserError


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="local Hugging Face model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--backend", default="native", help="native (fast, Llama family) or transformers (any causal LM)")
    g.add_argument("--dtype", default="auto",
                   help="weight format: auto (default: bfloat16 where the CPU has AVX-512 BF16 or AMX, else "
                        "float32), float32, bfloat16, int8 or int4 (native backend; see docs/engine.md)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def model_from_args(args: argparse.Namespace):
    from ..models import kernels, load_model

    model = load_model(args.model, backend=args.backend, dtype=args.dtype, threads=args.threads)
    if model.info.backend == "native" and kernels.attention_kernel() is None and \
            os.environ.get("PARADECODE_KERNELS", "1") != "0":
        print(f"paradecode: note: the compiled kernels are unavailable ({kernels.FAILURE}); running PyTorch's "
              "slower paths", file=sys.stderr)
    return model


def add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", default="plain", help="decoding method (list them with `paradecode methods`)")
    g.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. -o max_ngram=3)")


def parse_options(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"option {pair!r} is not KEY=VALUE", "write options like -o max_ngram=3")
        key = key.strip().replace("-", "_")
        if key in out:
            raise UserError(f"option {key} given twice ({out[key]!r} and {value.strip()!r})",
                            f"pass -o {key}=... once")
        out[key] = value.strip()
    return out


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    return parse_options(args.option)


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"most tokens to generate (default {max_new_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string, repeatable")


def generation_config(args: argparse.Namespace):
    from ..sampling import GenerationConfig, check_sampling_given

    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    given = {f for f, default in (("top_k", 0), ("top_p", 1.0), ("seed", None)) if getattr(args, f) != default}
    check_sampling_given(gen, given, spell=lambda f: "--" + f.replace("_", "-"))
    return gen


def read_prompt(args: argparse.Namespace) -> str:
    """--prompt TEXT, --prompt-file PATH, or stdin (when piped)."""
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("both --prompt and --prompt-file given", "pass only one of them")
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file is not None:
        path = args.prompt_file
        if path == "-":
            text = sys.stdin.read()
        else:
            if os.path.isdir(path):
                raise UserError(f"prompt file {path} is a folder", "pass --prompt-file a text file")
            if not os.path.isfile(path):
                raise UserError(f"prompt file {path} does not exist", "check the path given to --prompt-file")
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read prompt file {path}: {e}", "pass a readable UTF-8 text file") from None
    elif sys.stdin is not None and not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise UserError("no prompt given", "pass --prompt TEXT, --prompt-file PATH, or pipe text on stdin")
    if not text.strip():
        raise UserError("the prompt is empty", "pass some text with --prompt, --prompt-file, or stdin")
    return text


def read_messages(path: str) -> list[dict]:
    """--messages PATH ('-' for stdin): a JSON list of chat messages, or an object with a "messages" list
    (as an OpenAI request body has it, without the request's other fields, which the CLI's flags set). Their
    roles and contents are checked against the model's template later."""
    if path == "-":
        text = sys.stdin.read()
    elif os.path.isdir(path):
        raise UserError(f"messages file {path} is a folder", "pass --messages a JSON file")
    elif not os.path.isfile(path):
        raise UserError(f"messages file {path} does not exist", "check the path given to --messages")
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read messages file {path}: {e}", "pass a readable UTF-8 JSON file") from None
    where = "stdin" if path == "-" else path
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                        'write a list such as [{"role": "user", "content": "..."}]') from None
    if isinstance(data, dict) and "messages" in data:
        other = sorted(set(data) - {"messages"})
        if other:                       # a saved request's settings would be dropped without a word
            raise UserError(f"{where} holds {', '.join(other)} beside its messages, which the CLI does not read",
                            "keep only the messages in the file and set the rest with flags (--max-new-tokens, "
                            "--temperature, --stop, --model, ...)")
        data = data["messages"]
    if not isinstance(data, list) or not data or not all(isinstance(m, dict) for m in data):
        raise UserError(f"{where} does not hold a list of chat messages",
                        'write a list such as [{"role": "user", "content": "..."}]')
    return data


def writable_dir(path, option: str):
    """``path`` as a folder the command can write into, made if missing, checked before any work is done
    (a run that fails only when it saves loses what it computed)."""
    import tempfile
    from pathlib import Path

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"cannot write into {path}: {e.strerror or e}", f"pass {option} a folder you can write to",
                        field=option.lstrip("-")) from None
    return path


def writable_file(path, option: str):
    """``path`` as a file the command can write, its folder existing and writable, checked before any work."""
    from pathlib import Path

    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"the folder of {path} does not exist", f"create it or pass another {option} path",
                        field=option.lstrip("-"))
    if path.is_dir():
        raise UserError(f"{path} is a folder", f"pass {option} a file path", field=option.lstrip("-"))
    writable_dir(path.parent, option)
    return path
