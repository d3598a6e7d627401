"""`paradecode diffusion`: masked diffusion LMs — samplers, generate, train, train-filter, bench."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ._common import writable_dir, writable_file


def register(sub) -> None:
    p = sub.add_parser("diffusion", help="diffusion language models: samplers, generate, train, bench")
    dsub = p.add_subparsers(dest="diffusion_command", metavar="{samplers,generate,train,train-filter,bench}")
    p.set_defaults(func=lambda args: _no_subcommand(p))

    s = dsub.add_parser("samplers", help="list diffusion samplers and their options")
    s.set_defaults(func=run_samplers)

    g = dsub.add_parser("generate", help="decode one prompt with a diffusion sampler")
    g.add_argument("prompt", help='task prompt in the task vocabulary, e.g. "sort : d a c b"')
    g.add_argument("--sampler", default="threshold", help="diffusion sampler (see `paradecode diffusion samplers`)")
    g.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="sampler option")
    g.add_argument("--gen-length", type=int, default=10, help="answer slots (default 10)")
    g.add_argument("--weights", default=None, help="diffusion .safetensors (default: the shipped model)")
    g.add_argument("--llada", default=None, help="local LLaDA checkpoint directory instead of the task model "
                                                 "(prompt is then a list of token ids)")
    g.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    g.set_defaults(func=run_generate)

    t = dsub.add_parser("train", help="train the task diffusion model (CPU, resumable)")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: the shipped model's)")
    t.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    t.add_argument("--out", required=True, help="output .safetensors; the checkpoint is OUT.ckpt.pt")
    t.add_argument("--init", default=None, help="start from these weights (second stage)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3)")
    t.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 200)")
    t.add_argument("--mix", default=None, help='task-weight overrides, e.g. "reverse=4,text=1"')
    t.add_argument("--threads", type=int, default=1, help="CPU threads (default 1; the machine is shared)")
    t.set_defaults(func=run_train)

    f = dsub.add_parser("train-filter", help="fit the Learn2PD filter on the model's own trajectories")
    f.add_argument("--weights", default=None, help="diffusion .safetensors (default: the shipped model)")
    f.add_argument("--out", default=None, help="filter JSON (default: the shipped one)")
    f.add_argument("--per-task", type=int, default=30, help="training-seed instances per task (default 30)")
    f.set_defaults(func=run_train_filter)

    b = dsub.add_parser("bench", help="accuracy / NFE / wall time of every sampler per task, Pareto plots")
    b.add_argument("--tasks", default="all", help="comma-separated tasks (default: all)")
    b.add_argument("-n", type=int, default=50, help="held-out instances per task (default 50)")
    b.add_argument("--weights", default=None, help="diffusion .safetensors (default: the shipped model)")
    b.add_argument("--out", default="benchmarks", help="output directory (JSON, Markdown table, PNG plots)")
    b.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    b.add_argument("--no-cache-speed", action="store_true",
                   help="skip the cache wall-clock comparison on a larger random-weight model")
    b.set_defaults(func=run_bench)


def _no_subcommand(parser) -> int:
    """`paradecode diffusion` alone is a usage error, like `paradecode` alone: help on stderr, exit 2."""
    import sys

    parser.print_help(sys.stderr)
    return 2


def _options(pairs):
    from ._common import parse_options

    return parse_options(pairs)


def _model(weights):
    from ..diffusion.model import DiffusionTransformer, load_shipped

    return load_shipped() if weights is None else DiffusionTransformer.load(Path(weights))


def run_samplers(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..diffusion import DIFFUSION_SAMPLERS
    from ..diffusion.samplers import sampler_options

    table = Table(title="diffusion samplers (use: --sampler NAME -o KEY=VALUE)", show_lines=True)
    for c in ("sampler", "lossless", "what it does", "options (default)"):
        table.add_column(c)
    for name, cls in DIFFUSION_SAMPLERS.items():
        opts = "\n".join(f"{o['name']} = {o['default']!r} — {o['help']}" for o in sampler_options(cls))
        table.add_row(name, "yes" if cls.lossless else "no", cls.summary, opts)
    Console().print(table)
    return 0


def run_generate(args) -> int:
    from ..diffusion import VOCAB, build_sampler
    from ..models.loading import check_threads, set_threads

    check_threads(args.threads)
    if args.llada and args.weights:
        raise UserError("--llada and --weights both name the model to decode with",
                        "pass only one of them (--weights is for the task model)", field="weights")
    sampler = build_sampler(args.sampler, _options(args.option))
    set_threads(args.threads)
    if args.llada:
        from ..diffusion.llada import load_llada

        model = load_llada(args.llada)
        try:
            ids = [int(t) for t in args.prompt.split()]
        except ValueError:
            raise UserError("with --llada the prompt is a list of token ids", 'pass e.g. "126080 3 5 7"') from None
        r = sampler.decode(model, ids, args.gen_length)
        print(" ".join(map(str, r.answer[0].tolist())))
    else:
        from ..diffusion.tasks import format_prompt

        words = format_prompt(args.prompt)
        r = sampler.decode(_model(args.weights), VOCAB.encode(" ".join(words)), args.gen_length)
        print(VOCAB.decode(r.answer[0]))
    print(f"nfe={r.nfe} tokens/step={r.committed_per_step} wall={r.seconds * 1000:.1f} ms")
    return 0


def run_train(args) -> int:
    import dataclasses

    from ..diffusion.model import read_shape
    from ..diffusion.train import TrainConfig, checkpoint_path, read_checkpoint, train
    from ..models.loading import check_threads

    cfg = TrainConfig()
    changes = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("init_from", args.init),
                                 ("lr", args.lr), ("warmup", args.warmup), ("mix", args.mix)) if v is not None}
    cfg = dataclasses.replace(cfg, **changes)
    cfg.validate()
    check_threads(args.threads)
    out = writable_file(args.out, "--out")
    if cfg.init_from:
        read_shape(Path(cfg.init_from))              # a bad --init fails now, named, before the run starts
    ckpt = checkpoint_path(out)
    state = read_checkpoint(ckpt, cfg)
    if state is not None and state["step"] >= cfg.steps and out.is_file():
        print(f"{out} is already trained: its checkpoint {ckpt} is at step {state['step']} of {cfg.steps}, "
              f"so there is nothing to do (delete {ckpt} to train again)")
        return 0
    train(cfg, out, threads=args.threads)
    print(f"wrote {args.out}")
    return 0


def run_train_filter(args) -> int:
    import torch

    from ..diffusion.learn2pd import FILTER_PATH, train_filter

    if args.per_task < 1:
        raise UserError(f"--per-task must be >= 1, got {args.per_task}", "pass a positive number of instances",
                        field="per_task")
    torch.set_num_threads(1)
    out = writable_file(args.out, "--out") if args.out else FILTER_PATH
    meta = train_filter(_model(args.weights), out, args.per_task)
    print(f"wrote {args.out or FILTER_PATH}: {meta}")
    return 0


def run_bench(args) -> int:
    from ..diffusion import bench
    from ..diffusion.tasks import TASKS
    from ..models.loading import check_threads, set_threads

    tasks = tuple(TASKS) if args.tasks == "all" else tuple(t.strip() for t in args.tasks.split(","))
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UserError(f"unknown task {bad[0]!r}", f"choose from: {', '.join(TASKS)}")
    if args.n < 1:
        raise UserError(f"-n must be >= 1, got {args.n}", "pass a positive number of instances")
    check_threads(args.threads)
    model = _model(args.weights)                     # bad weights fail before --out is made
    writable_dir(args.out, "--out")
    set_threads(args.threads)
    rows = bench.run(model, tasks, args.n)
    speed = None if args.no_cache_speed else bench.cache_speed()
    paths = bench.save(rows, Path(args.out), bench.machine_name(), speed)
    print(paths["markdown"].read_text())
    print(f"wrote {paths['json']}, {paths['markdown']} and {len(paths['plots'])} plots in {args.out}")
    return 0
