"""`paradecode bench`: methods × task categories on a model, peers side by side, resumable."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..errors import UserError
from ._common import parse_options


def register(sub) -> None:
    from ..bench.peers import PEERS
    from ..bench.prompts import CATEGORIES

    p = sub.add_parser(
        "bench", help="benchmark decoding methods per task category (Spec-Bench style), with peers",
        description="Measure every registered method (or --methods) against plain decoding in the same process "
                    "on the shipped prompt suites; write results.jsonl (resumable), report.md, report.json "
                    "and plots to --out. See docs/benchmark.md.")
    p.add_argument("--model", nargs="+", default=[None], metavar="PATH",
                   help="one or more Hugging Face directories or .gguf files (default: embedded SmolLM2-135M)")
    p.add_argument("--backend", default="native", help="native (fast, Llama family) or transformers")
    p.add_argument("--dtype", default="auto",
                   help="weight format: auto (bfloat16 where the CPU has AVX-512 BF16 or AMX, else float32), float32, "
                        "bfloat16, int8 or int4 (native backend)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: every registered autoregressive method)")
    p.add_argument("--categories", default=None, help=f"comma-separated, from: {', '.join(CATEGORIES)} (default all)")
    p.add_argument("--num-prompts", type=int, default=3, help="prompts per category (default 3; 0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--repeats", type=int, default=1, help="measurements per prompt and method (median; default 1)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per method before measuring (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (decoding is greedy)")
    p.add_argument("--peers", default=None,
                   help=f"comma-separated peers from: {', '.join(PEERS)}; 'none' to skip (default all available)")
    p.add_argument("--draft-model", default=None,
                   help="a smaller model with the same tokenizer, for transformers-assisted and for methods "
                        "with a draft_model option")
    p.add_argument("-o", "--option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="a method option, repeatable (e.g. -o pld:max_ngram=3)")
    p.add_argument("--sweep", action="append", default=[], metavar="METHOD:OPTION=V1,V2",
                   help="also measure a method at several option values, e.g. --sweep pld:num_draft_tokens=2,4,8")
    p.add_argument("--out", default="paradecode-bench", help="output folder (default ./paradecode-bench)")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out instead of resuming")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rebuild the report from the lines already in --out (partial runs too)")
    p.set_defaults(func=run)


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [x.strip() for x in value.split(",") if x.strip()]


def _method_options(pairs: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for pair in pairs:
        method, sep, kv = pair.partition(":")
        if not sep or not method.strip():
            raise UserError(f"option {pair!r} is not METHOD:KEY=VALUE", "write e.g. -o pld:max_ngram=3",
                            field="option")
        given = out.setdefault(method.strip(), {})
        for key, value in parse_options([kv]).items():
            if key in given:
                raise UserError(f"option {method.strip()}:{key} given twice ({given[key]!r} and {value!r})",
                                f"pass -o {method.strip()}:{key}=... once (--sweep measures several values)",
                                field="option")
            given[key] = value
    return out


def config_from_args(args):
    from ..bench.runner import BenchConfig
    from ..models.loading import check_threads

    check_threads(args.threads)
    if args.num_prompts < 0:
        raise UserError("--num-prompts must be ≥ 0", "pass 0 for all prompts or a positive number")
    peers = _csv(args.peers)
    if peers == []:
        raise UserError("--peers is empty", "name peers, or pass --peers none to measure none", field="peers")
    return BenchConfig(
        models=list(args.model), methods=_csv(args.methods), categories=_csv(args.categories),
        num_prompts=args.num_prompts or None, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
        seed=args.seed, threads=args.threads, backend=args.backend, dtype=args.dtype, out=Path(args.out),
        peers=[] if peers == ["none"] else peers, warmup=args.warmup, sweeps=list(args.sweep),
        options=_method_options(args.option), draft_model=args.draft_model, fresh=args.fresh,
        report_only=args.report_only,
        command=_command_line(args))


def _command_line(args) -> str:
    """The command as typed (from sys.argv), or an equivalent one when called in-process."""
    if sys.argv[1:2] == ["bench"]:
        return "paradecode " + shlex.join(sys.argv[1:])
    words = ["bench"]
    for action in ("model", "methods", "categories", "num_prompts", "max_new_tokens", "repeats", "warmup",
                   "seed", "threads", "peers", "draft_model", "out", "backend", "dtype"):
        value = getattr(args, action)
        if value is None or value == [None]:
            continue
        words += [f"--{action.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    for flag, values in (("-o", args.option), ("--sweep", args.sweep)):
        for v in values:
            words += [flag, v]
    for flag in ("fresh", "report_only"):
        if getattr(args, flag):
            words.append(f"--{flag.replace('_', '-')}")
    return "paradecode " + shlex.join(words)


def run(args) -> int:
    import torch
    from rich.console import Console

    from ..bench.runner import run_benchmark

    cfg = config_from_args(args)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    console = Console(stderr=True)
    report = run_benchmark(cfg, console=console)
    out = Path(cfg.out)
    if not report["lines"]:             # every method and peer skipped (e.g. a draft model that does not fit)
        raise UserError(f"nothing was measured: every method and peer of this run was skipped (empty report in "
                        f"{out})", "see the notes above for why")
    console.print(f"[green]report:[/green] {out / 'report.md'} (JSON: {out / 'report.json'}, "
                  f"lines: {out / 'results.jsonl'})")
    print((out / "report.md").read_text())
    if report["exactness_failures"]:
        console.print(f"[bold red]{len(report['exactness_failures'])} exactness failure(s) of lossless methods "
                      f"— see the report[/bold red]")
        return 1
    return 0
