"""`paradecode generate`: one prompt, one method, streamed output and its cost."""

from __future__ import annotations

import json
import sys

from ._common import (add_generation_args, add_method_args, add_model_args, generation_config, method_options,
                      model_from_args, read_messages, read_prompt)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a decoding method and print its stats",
                       description="Generate a continuation of a prompt; tokens stream as they are accepted.")
    p.add_argument("--prompt", "-p", default=None, help="the prompt text")
    p.add_argument("--prompt-file", "-f", default=None, help="read the prompt from a file ('-' for stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--messages", "-m", default=None, metavar="FILE",
                   help="a conversation instead of a prompt: a JSON list of {role, content} messages "
                        "('-' for stdin); the chat template applies")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token_ids, stats) on the last line")
    p.add_argument("--no-stream", action="store_true", help="print the text only at the end")
    add_model_args(p)
    add_method_args(p)
    add_generation_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import generate
    from ..errors import UserError
    from ..methods import get_method

    gen = generation_config(args)                      # validate cheap things before loading the model
    method = get_method(args.method, method_options(args))
    if args.messages is not None:
        if args.prompt is not None or args.prompt_file is not None:
            raise UserError("both --messages and a prompt given", "pass either --messages or --prompt/--prompt-file")
        prompt = read_messages(args.messages)
    else:
        prompt = read_prompt(args)
    model = model_from_args(args)
    stream = None if (args.no_stream or args.json) else _printer()
    out = generate(model, prompt, method, chat=args.chat, gen=gen, stream=stream)
    if stream is None and not args.json:
        print(out.text)
    elif stream is not None:
        print()
    if args.json:
        print(json.dumps({**out.to_dict(), "prompt_tokens": len(out.prompt_ids), "model": model.info.name,
                          "dtype": model.info.dtype, "backend": model.info.backend}))
    else:
        print(f"[{out.stats.summary()}; finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def _printer():
    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()
    return write
