"""`paradecode demo`: plain decoding vs a parallel method on the default model, side by side."""

from __future__ import annotations

from ._common import add_model_args, model_from_args, parse_options

ARTICLE = (
    "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. Supporters said the "
    "lanes would make cycling safer and reduce traffic. Shop owners worried that removing parking spaces "
    "would hurt their business. The council voted 5 to 2 to build the lanes next spring, and promised to "
    "add a new parking lot behind the library."
)
DEMO_PROMPT = f"Summarize the following text in two sentences.\n\n{ARTICLE}"
# the best lossless method measured on this machine, input-grounded and open-ended (benchmarks/RESULTS.md)
DEMO_METHOD = "quantspec"


def register(sub) -> None:
    p = sub.add_parser("demo", help="compare plain decoding with a parallel method on the default model")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="prompt (default: summarise a short article)")
    p.add_argument("--method", default=DEMO_METHOD, help=f"parallel method to compare (default {DEMO_METHOD})")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the compared method, repeatable (e.g. -o max_ngram=3)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.panel import Panel

    from ..api import generate
    from ..methods import get_method

    from ..errors import UserError
    from ..sampling import GenerationConfig

    options = parse_options(args.option)
    method = get_method(args.method, options)               # fail fast, before the model loads
    GenerationConfig(max_new_tokens=args.max_new_tokens)
    if not args.prompt.strip():
        raise UserError("the prompt is empty", "pass some text with --prompt, or leave it out for the demo's")
    console = Console()
    model = model_from_args(args)
    console.print(f"[bold]model[/bold] {model.info.name} ({model.info.backend}, {model.info.dtype})")
    console.print(Panel(args.prompt, title="prompt"))
    runs = {"plain": None, args.method: options}
    for name, opts in runs.items():                      # warm-up (quantspec builds its int4 twin here)
        generate(model, "Hello", name, opts, max_new_tokens=4, chat=True)
    outs = {}
    for name, opts in runs.items():
        out = generate(model, args.prompt, name, opts, chat=True, max_new_tokens=args.max_new_tokens)
        outs[name] = out
        console.print(Panel(out.text, title=f"{name}"))
        console.print(f"  {out.stats.summary()}")
    a, b = outs["plain"], outs[args.method]
    same = a.token_ids == b.token_ids
    speed = b.stats.tokens_per_s / a.stats.tokens_per_s if a.stats.tokens_per_s else float("nan")
    console.print(f"[bold]{args.method}[/bold]: {speed:.2f}x plain tokens/s, "
                  f"{b.stats.tokens_per_call:.2f} tokens per model call, output identical to plain: "
                  f"{'[green]yes[/green]' if same else '[red]NO[/red]'}")
    return 0 if same or not method.lossless else 1
