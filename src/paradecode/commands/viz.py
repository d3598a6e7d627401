"""`paradecode viz`: run one decode with tracing and draw its trajectory (HTML page + PNG)."""

from __future__ import annotations

import os
import sys

from ._common import (add_generation_args, add_method_args, add_model_args, generation_config, method_options,
                      model_from_args, read_prompt, writable_file)


def register(sub) -> None:
    p = sub.add_parser("viz", help="visualise a decode call by call (self-contained HTML page + PNG)",
                       description="Run one decode with tracing and write an HTML page showing, call by call, "
                                   "which tokens were proposed and accepted and how Jacobi guesses converged.")
    p.add_argument("--prompt", "-p", default=None, help="the prompt text")
    p.add_argument("--prompt-file", "-f", default=None, help="read the prompt from a file ('-' for stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--out", default="trajectory.html", help="HTML page to write (default trajectory.html)")
    p.add_argument("--png", default=None, help="PNG to write (default: the page's path with .png)")
    p.add_argument("--no-png", action="store_true", help="skip the PNG")
    add_model_args(p)
    add_method_args(p)
    add_generation_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import generate
    from ..errors import UserError
    from ..methods import get_method
    from ..viz import write_trajectory

    if args.no_png and args.png is not None:
        raise UserError("both --png and --no-png given", "pass only one of them")
    writable_file(os.path.abspath(args.out), "--out")             # before the decode, not after it
    if not args.out.lower().endswith((".html", ".htm")):
        raise UserError(f"--out {args.out} is not an .html file", "pass --out a path ending in .html (the page)")
    png = None if args.no_png else (args.png or os.path.splitext(args.out)[0] + ".png")
    if png is not None:
        if not png.lower().endswith(".png"):
            raise UserError(f"--png {png} is not a .png file", "pass --png a path ending in .png, or --no-png")
        writable_file(os.path.abspath(png), "--png")
    gen = generation_config(args)
    options = method_options(args)
    method = get_method(args.method, options)
    prompt = read_prompt(args)
    model = model_from_args(args)
    result = generate(model, prompt, method, chat=args.chat, gen=gen, trace=True)
    rows = write_trajectory(result, args.out, png, tokenizer=model.tokenizer, method=method.name, options=options,
                            prompt_text=prompt)
    print(f"wrote {args.out}" + (f" and {png}" if png else "") + f" ({len(rows)} calls)", file=sys.stderr)
    print(f"[{result.stats.summary()}]", file=sys.stderr)
    return 0
