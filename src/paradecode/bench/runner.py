"""Run the benchmark matrix: models × (methods + peers) × prompts × repeats, resumably.

Measurement protocol (Spec-Bench conventions, greedy, batch 1):

1. warm-up: plain decoding and every method/peer run ``warmup`` times on the
   first prompt (not recorded);
2. for each repeat, for each prompt, for each method or peer: a plain
   decoding run, then the method's run, in the same process (ABAB). The pair
   is one *line* of ``results.jsonl``;
3. the method's tokens are compared with the paired plain run (exactness);
   a lossless method that differs is reported loudly with the first
   differing position.

``results.jsonl`` is appended line by line (flushed); a rerun with the same
settings skips the lines already present, so an interrupted run continues
where it stopped. Lines made with other measurement settings (max new tokens,
threads, dtype, backend, seed) are refused unless ``fresh=True``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UserError
from .metrics import PeakRSS, first_difference
from .prompts import BenchPrompt, load_prompts

RESULTS_FILE = "results.jsonl"
FORMAT_VERSION = 1


@dataclass
class BenchConfig:
    models: list[str | None] = field(default_factory=lambda: [None])
    methods: list[str] | None = None          # None: every registered autoregressive method
    categories: list[str] | None = None       # None: all
    num_prompts: int | None = 3               # per category; None: all
    max_new_tokens: int = 64
    repeats: int = 1
    seed: int = 0
    threads: int | None = None
    backend: str = "native"
    dtype: str = "auto"                       # resolved for this CPU when the config is made
    out: Path = Path("paradecode-bench")
    peers: list[str] | None = None            # None: all known peers; []: none
    warmup: int = 1
    sweeps: list[str] = field(default_factory=list)     # "method:option=v1,v2"
    options: dict[str, dict] = field(default_factory=dict)   # method -> {option: value}
    draft_model: str | None = None
    fresh: bool = False
    report_only: bool = False                 # build the report from the lines present, measure nothing
    command: str = ""

    def __post_init__(self) -> None:
        if self.dtype == "auto":            # what the lines were measured with, so a resumed run compares it
            from ..models.loading import auto_dtype

            self.dtype = auto_dtype(self.backend)

    def measurement_key(self) -> str:
        """Hash of the settings that change what a line means (not of the matrix's extent)."""
        key = {"v": FORMAT_VERSION, "max_new_tokens": self.max_new_tokens, "seed": self.seed,
               "threads": self.threads, "backend": self.backend, "dtype": self.dtype, "temperature": 0.0}
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Variant:
    """One column of the matrix: a method with options, or a peer."""

    key: str                     # "pld", "pld[max_ngram=3]", "peer:transformers"
    name: str
    kind: str                    # "method" | "peer"
    lossless: bool = False
    options: dict = field(default_factory=dict)
    sweep: tuple[str, Any] | None = None     # (option, value) when part of a --sweep
    runner: Any = None           # Method instance or Peer

    def describe(self) -> dict:
        return {"key": self.key, "name": self.name, "kind": self.kind, "lossless": self.lossless,
                "options": self.options, **({"sweep": list(self.sweep)} if self.sweep else {})}


def variant_key(name: str, options: dict) -> str:
    if not options:
        return name
    return f"{name}[{','.join(f'{k}={v}' for k, v in sorted(options.items()))}]"


def parse_sweep(spec: str) -> tuple[str, str, list[str]]:
    """``"pld:max_draft=2,4,8"`` -> ("pld", "max_draft", ["2", "4", "8"])."""
    method, sep, rest = spec.partition(":")
    option, sep2, values = rest.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not sep2 or not method.strip() or not option.strip() or not vals:
        raise UserError(f"sweep {spec!r} is not METHOD:OPTION=V1,V2,...",
                        "write e.g. --sweep pld:num_draft_tokens=2,4,8", field="sweep")
    return method.strip(), option.strip().replace("-", "_"), vals


# -- results file --------------------------------------------------------------

class ResultsFile:
    """Append-only JSONL of measured lines; knows which lines are already done.

    ``fresh``: the lines already there are ignored and the file is emptied only when the first new line is
    written, so a run that stops before measuring anything (a bad option, a model that does not load) loses
    nothing. ``read_only`` (``--report-only``): the file must already exist; nothing is written to it.
    """

    def __init__(self, path: Path, config_key: str, *, fresh: bool = False, read_only: bool = False):
        self.path = path
        self.config_key = config_key
        self._empty_first = False
        if read_only:
            if not path.is_file():
                raise UserError(f"no results to report: {path} does not exist",
                                "pass --out the folder of an earlier run, or drop --report-only to measure",
                                field="out")
        else:
            try:                      # before anything is measured: the lines must have somewhere to go
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8"):
                    pass
            except OSError as e:
                raise UserError(f"cannot write the benchmark's results in {path.parent}: {e.strerror or e}",
                                "pass --out a folder you can write to", field="out") from None
        self.lines: list[dict] = []
        if fresh:
            self._empty_first = path.stat().st_size > 0
            return
        for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:           # a line cut by an interruption: measure it again
                continue
            if line.get("config") != config_key:
                fix = ("pass the --max-new-tokens, --seed, --threads, --dtype and --backend of the run that "
                       "measured them" if read_only else "use another --out folder, or pass --fresh to start over")
                raise UserError(f"{path} holds results measured with other settings (line {n})", fix)
            self.lines.append(line)

    @staticmethod
    def key(line: dict) -> tuple:
        return line["model"], line["method"], line["prompt_id"], line["repeat"]

    def done(self) -> set[tuple]:
        return {self.key(ln) for ln in self.lines if not ln.get("error")}

    def append(self, line: dict) -> None:
        line = {"config": self.config_key, **line}
        # the previous line may lack its newline if a run was killed mid-write
        text = self.path.read_bytes()[-1:] if self.path.exists() and self.path.stat().st_size else b"\n"
        mode = "a"
        if self._empty_first:         # --fresh: the earlier lines go only now that a new one replaces them
            mode, text, self._empty_first = "w", b"\n", False
        with open(self.path, mode, encoding="utf-8") as f:
            if text != b"\n":
                f.write("\n")
            f.write(json.dumps(line) + "\n")
            f.flush()
        self.lines.append(line)


# -- one model -------------------------------------------------------------------

@dataclass
class LoadedModel:
    label: str                   # key used in the results ("default", a path, "tiny")
    model: Any                   # CausalLM
    hf_model: Any = None         # a transformers model with the same weights, if already at hand


def load_bench_model(spec: str | None, cfg: BenchConfig) -> LoadedModel:
    if spec == "tiny":           # test hook: a random-weight tiny Llama, prompts become token ids
        from ..models.tiny import tiny_pair

        hf, native = tiny_pair("llama", seed=0)
        return LoadedModel("tiny", native, hf.model)
    from ..models import load_model

    return LoadedModel(spec or "default", load_model(spec, backend=cfg.backend, dtype=cfg.dtype,
                                                     threads=cfg.threads))


def in_matrix(cls) -> bool:
    """Autoregressive-model methods (plain, draft-and-verify, Jacobi...) belong here; diffusion LMs do not."""
    return "diffusion" not in str(cls.family).lower()


DRAFT_OPTIONS = ("draft_model", "draft", "draft_path")     # options --draft-model fills in


def build_variants(cfg: BenchConfig, notes: list[str]) -> list[Variant]:
    """The methods of the matrix (registry order), their option variants and sweeps.

    Every option (``-o``) and sweep must be for a method of the run, and is validated here, before any model
    is loaded. When measuring, a method that needs a draft model and has none is refused if named in
    ``--methods`` and skipped with a note otherwise.
    """
    from ..methods.base import all_methods, get_method, method_options
    from ..models.loading import check_model_path

    registry = all_methods()
    sweeps = [(spec, *parse_sweep(spec)) for spec in cfg.sweeps]
    wanted = cfg.methods
    if wanted is None:
        wanted = [n for n, c in registry.items() if n != "plain" and in_matrix(c)]
    for m in list(wanted) + [s[1] for s in sweeps] + list(cfg.options):
        if m not in registry:
            raise UserError(f"unknown method {m!r}", f"choose from: {', '.join(registry)}", field="methods")
    for m in cfg.options:
        if m not in wanted and m != "plain":
            raise UserError(f"-o {m}:... is an option of method {m}, which is not in this run",
                            f"add {m} to --methods, or drop the option", field="option")
    get_method("plain", cfg.options.get("plain"))         # the baseline takes none: say so
    for spec, m, _, _ in sweeps:
        if m not in wanted:
            raise UserError(f"--sweep {spec} is for method {m}, which is not in this run",
                            f"add {m} to --methods, or drop the sweep", field="sweep")
    variants: list[Variant] = []
    no_draft: set[str] = set()

    def add(name: str, options: dict, sweep=None) -> None:
        cls = registry[name]
        if not in_matrix(cls):
            notes.append(f"{name}: skipped — a {cls.family} method is not part of the autoregressive matrix")
            return
        opts = dict(cfg.options.get(name, {}))
        drafts = [o["name"] for o in method_options(cls) if o["name"] in DRAFT_OPTIONS]
        for o in drafts:
            if cfg.draft_model and o not in opts:
                opts[o] = cfg.draft_model
        opts.update(options)
        key = variant_key(name, options if sweep else {k: v for k, v in opts.items()
                                                        if k in cfg.options.get(name, {})})
        if any(v.key == key for v in variants):
            return
        method = get_method(name, opts)          # a bad option or value is the user's to fix: raise
        for o in drafts:
            given = opts.get(o)
            if isinstance(given, str) and not cfg.report_only and (o in options or o in cfg.options.get(name, {})):
                check_model_path(given, f"--sweep {name}:{o}" if o in options else f"-o {name}:{o}", "draft model")
        if drafts and not cfg.report_only and not any(opts.get(o) for o in drafts):
            if cfg.methods is not None:
                raise UserError(f"method {name} needs a draft model", "pass --draft-model PATH (a smaller model "
                                "with the target's tokenizer), or leave it out of --methods", field="draft_model")
            if name not in no_draft:
                no_draft.add(name)
                notes.append(f"{name}: skipped — no draft model (pass --draft-model PATH to include it)")
            return
        variants.append(Variant(key, name, "method", bool(cls.lossless), opts, sweep, method))

    for name in wanted:
        if name != "plain":
            add(name, {})
    for _, name, option, values in sweeps:
        for v in values:
            add(name, {option: v}, sweep=(option, v))
    return variants


def check_config(cfg: BenchConfig, specs: Sequence) -> None:
    """Refuse what cannot make a sensible run, before any file is touched or model loaded."""
    from ..models.loading import check_model_path, check_threads
    from ..sampling import GenerationConfig
    from .peers import PEERS

    if cfg.report_only and cfg.fresh:
        raise UserError("--report-only and --fresh together would discard the results the report is built from",
                        "drop --fresh to rebuild the report, or drop --report-only to measure afresh", field="fresh")
    if cfg.repeats < 1:
        raise UserError(f"--repeats must be ≥ 1, got {cfg.repeats}",
                        "pass how many times to measure each prompt (1 or more; the report takes the median)",
                        field="repeats")
    if cfg.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be ≥ 1, got {cfg.max_new_tokens}",
                        "pass how many tokens to generate per prompt (e.g. 64)", field="max_new_tokens")
    if cfg.warmup < 0:
        raise UserError(f"--warmup must be ≥ 0, got {cfg.warmup}", "pass 0 to skip warming up, or more",
                        field="warmup")
    if cfg.num_prompts is not None and cfg.num_prompts < 1:
        raise UserError(f"num_prompts must be ≥ 1, got {cfg.num_prompts}",
                        "pass None for all prompts (the CLI's --num-prompts 0)", field="num_prompts")
    GenerationConfig(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)      # the seed's range
    check_threads(cfg.threads)
    if cfg.methods is not None and not cfg.methods:
        raise UserError("--methods is empty", "name methods (e.g. --methods pld,jacobi), or leave --methods out "
                        "for every registered method", field="methods")
    if cfg.categories is not None and not cfg.categories:
        raise UserError("--categories is empty", "name categories (e.g. --categories qa,code), or leave "
                        "--categories out for all of them", field="categories")
    unknown = [n for n in cfg.peers or [] if n not in PEERS]
    if unknown:
        raise UserError(f"unknown peer {unknown[0]!r}", f"choose from: {', '.join(PEERS)} (or none)", field="peers")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file", "--out needs a folder (new, or one from an earlier run) for "
                        "results.jsonl and the report", field="out")
    if cfg.report_only:                 # nothing is loaded: the paths need not exist any more
        return
    for spec in specs:
        if isinstance(spec, str) and spec not in ("default", "tiny"):
            check_model_path(spec, "--model")
    if cfg.draft_model is not None:
        check_model_path(cfg.draft_model, "--draft-model", "draft model")


def build_peers(cfg: BenchConfig, lm: LoadedModel, notes: list[str]) -> list[Variant]:
    from .peers import PEERS, PeerContext

    names = list(PEERS) if cfg.peers is None else cfg.peers       # names checked by check_config
    info = lm.model.info
    ctx = PeerContext(model_spec=None if lm.label == "default" else lm.label, eos_token_ids=info.eos_token_ids,
                      pad_token_id=info.pad_token_id, threads=cfg.threads, draft_model=cfg.draft_model,
                      hf_model=lm.hf_model)
    out = []
    for n in names:
        peer = PEERS[n](ctx)
        try:
            note = peer.setup()
        except UserError as e:
            note = e.message
        except Exception as e:  # a peer that cannot start must not stop the benchmark
            note = f"failed to start: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if note:
            notes.append(f"peer {n}: skipped — {note}")
        else:
            out.append(Variant(f"peer:{n}", n, "peer", False, {}, None, peer))
    return out


# -- measuring ---------------------------------------------------------------------

def _run_method(model, ids: list[int], method, max_new_tokens: int, seed: int) -> dict:
    from ..api import generate

    with PeakRSS() as mem:
        r = generate(model, list(ids), method, max_new_tokens=max_new_tokens, seed=seed)
    s = r.stats
    return {"tokens": r.token_ids, "new_tokens": s.new_tokens, "wall": s.wall_time, "model_calls": s.model_calls,
            "accepted_sum": sum(s.accepted_lengths), "accepted_count": len(s.accepted_lengths),
            "accepted_histogram": {str(k): v for k, v in s.accepted_histogram().items()},
            "draft": s.draft_time, "verify": s.verify_time, "prefill": s.prefill_time,
            "finish": r.finish_reason, "rss_peak_mb": mem.peak_mb, "rss_delta_mb": mem.delta_mb}


def _run_peer(peer, ids: list[int], max_new_tokens: int) -> dict:
    with PeakRSS() as mem:
        tokens, wall, first = peer.generate(list(ids), max_new_tokens)
    return {"tokens": tokens, "new_tokens": len(tokens), "wall": wall, "prefill": first, "rss_peak_mb": mem.peak_mb,
            "rss_delta_mb": mem.delta_mb}


def _run(v: Variant, model, ids, cfg: BenchConfig) -> dict:
    if v.kind == "peer":
        return _run_peer(v.runner, ids, cfg.max_new_tokens)
    return _run_method(model, ids, v.runner, cfg.max_new_tokens, cfg.seed)


def measure_line(v: Variant, model, prompt: BenchPrompt, ids: list[int], repeat: int, cfg: BenchConfig,
                 plain) -> dict:
    """One ABAB pair: plain decoding, then the variant, on the same prompt."""
    base = _run_method(model, ids, plain, cfg.max_new_tokens, cfg.seed)
    line: dict[str, Any] = {"model": None, "method": v.key, "kind": v.kind, "lossless": v.lossless,
                            "prompt_id": prompt.id, "category": prompt.category, "repeat": repeat,
                            "prompt_tokens": len(ids),
                            "plain": {"new_tokens": base["new_tokens"], "wall": base["wall"], "prefill": base["prefill"]}}
    try:
        run = _run(v, model, ids, cfg)
    except UserError as e:  # the method is not usable as configured (e.g. needs a draft model)
        line.update(error=e.message, user_error=True, exact=False, first_diff=None, run={})
        return line
    except Exception as e:  # one broken method must not stop the benchmark; the report shows the error
        line.update(error=f"{type(e).__name__}: {e}", exact=False, first_diff=None, run={})
        return line
    diff = first_difference(run["tokens"], base["tokens"])
    line["exact"] = diff is None
    line["first_diff"] = diff
    if diff is not None:
        line["differs"] = {"plain": base["tokens"][diff:diff + 5], "method": run["tokens"][diff:diff + 5]}
    line["rss_peak_mb"] = round(run.pop("rss_peak_mb"), 1)
    line["rss_delta_mb"] = round(run.pop("rss_delta_mb"), 1)
    run.pop("tokens")
    line["run"] = run
    line["error"] = None
    return line


def run_benchmark(cfg: BenchConfig, *, models: Sequence[LoadedModel] | None = None,
                  prompts: Sequence[BenchPrompt] | None = None, console=None,
                  on_line: Callable[[dict], None] | None = None) -> dict:
    """Measure what is missing from ``cfg.out/results.jsonl``, then write the report; return it.

    ``models``/``prompts`` let callers (tests, notebooks) pass loaded models
    and their own prompts (e.g. token ids) instead of ``cfg.models`` and the
    shipped suites.
    """
    from rich.console import Console
    from rich.markup import escape

    from ..methods.base import get_method
    from .report import build_report, write_report

    console = console or Console(stderr=True)
    specs = list(models) if models is not None else list(cfg.models)
    check_config(cfg, specs)
    prompts = list(prompts) if prompts is not None else load_prompts(cfg.categories, cfg.num_prompts)
    if not prompts:
        raise UserError("no prompts selected", "check --categories and --num-prompts")
    notes: list[str] = []
    variants = build_variants(cfg, notes)          # validate methods before touching --out or loading a model
    if not variants and cfg.peers == []:
        raise UserError("nothing to measure: plain decoding is the baseline of every line, and no other method "
                        "or peer is in this run",
                        "name a method (e.g. --methods pld) or a peer (e.g. --peers transformers)", field="methods")
    out = Path(cfg.out)
    results = ResultsFile(out / RESULTS_FILE, cfg.measurement_key(), fresh=cfg.fresh, read_only=cfg.report_only)
    for n in notes:
        console.print(f"[yellow]note:[/yellow] {escape(n)}")
    plain = get_method("plain")
    selection: set[tuple] = set()
    described: dict[str, dict] = {v.key: v.describe() for v in variants}
    model_names: dict[str, str] = {}
    computed = 0
    if cfg.report_only:
        selection, model_names = _existing_selection(cfg, specs, variants, prompts, results, described, notes)
        specs = []
    for spec in specs:
        lm = spec if isinstance(spec, LoadedModel) else load_bench_model(spec, cfg)
        model_names[lm.label] = lm.model.info.name
        peer_notes: list[str] = []
        matrix = variants + build_peers(cfg, lm, peer_notes)
        for n in peer_notes:
            console.print(f"[yellow]note:[/yellow] {escape(n)}")
        notes += [n for n in peer_notes if n not in notes]
        if not matrix:
            raise UserError(f"nothing to measure on {lm.label}: every peer was skipped and no method besides plain "
                            "is in this run", "see the notes above, or name a method with --methods")
        described.update({v.key: v.describe() for v in matrix})
        ids_of = {p.id: p.encode(lm.model) for p in prompts}
        for p in prompts:
            if len(ids_of[p.id]) + cfg.max_new_tokens > lm.model.max_context:
                raise UserError(f"prompt {p.id} ({len(ids_of[p.id])} tokens) + {cfg.max_new_tokens} new tokens "
                                f"exceed the context of {lm.model.info.name}", "lower --max-new-tokens")
        done = results.done()
        todo = [(r, p, v) for r in range(cfg.repeats) for p in prompts for v in matrix
                if (lm.label, v.key, p.id, r) not in done]
        selection |= {(lm.label, v.key, p.id, r) for r in range(cfg.repeats) for p in prompts for v in matrix}
        skipped = len(done & selection)
        if skipped:
            console.print(f"resuming: {skipped} lines of {lm.label} already in {results.path}, "
                          f"{len(todo)} to measure")
        if not todo:
            continue
        _warmup(cfg, lm, matrix, plain, ids_of[prompts[0].id], console)
        computed += _measure(cfg, lm, todo, plain, ids_of, results, console, on_line, notes)
    lines = [ln for ln in results.lines if ResultsFile.key(ln) in selection]
    report = build_report(lines, cfg=cfg, variants=described, notes=notes, model_names=model_names,
                          categories=[c for c in _categories(prompts)], computed=computed)
    write_report(report, out)
    return report


def _existing_selection(cfg, specs, variants, prompts, results, described, notes):
    """--report-only: the requested lines that are present (a partial matrix is fine), without loading models."""
    from ..models.loading import DEFAULT_MODEL_NAME
    from .peers import PEERS

    labels = [s.label if isinstance(s, LoadedModel) else (s or "default") for s in specs]
    keys = {v.key for v in variants} | {f"peer:{n}" for n in (PEERS if cfg.peers is None else cfg.peers)}
    wanted = {(m, k, p.id, r) for m in labels for k in keys for p in prompts for r in range(cfg.repeats)}
    present = {ResultsFile.key(ln) for ln in results.lines if not ln.get("error")}
    selection = wanted & present
    if not selection:                       # an empty report would replace the one these lines made
        raise UserError(f"none of the {len(wanted)} requested lines is in {results.path} "
                        f"({len(results.lines)} line(s) there)", "pass the --model, --methods, --categories, "
                        "--num-prompts and --repeats of the run that measured them", field="out")
    for ln in results.lines:
        if ResultsFile.key(ln) in selection and ln["method"] not in described:
            described[ln["method"]] = {"key": ln["method"], "name": ln["method"].removeprefix("peer:"),
                                       "kind": ln.get("kind", "method"), "lossless": ln.get("lossless", False),
                                       "options": {}}
    previous = Path(cfg.out) / "report.json"
    if previous.is_file():                  # keep the notes of the run that measured the lines
        try:
            notes += [n for n in json.loads(previous.read_text()).get("notes", []) if n not in notes
                      and not n.startswith("report built from")]
        except ValueError:
            pass
    notes.append(f"report built from the lines already measured (--report-only): {len(selection)} of "
                 f"{len(wanted)} requested lines present")
    names = {m: DEFAULT_MODEL_NAME if m == "default" else m for m in labels}
    return selection, names


def _categories(prompts: Sequence[BenchPrompt]) -> list[str]:
    seen: dict[str, None] = {}
    for p in prompts:
        seen.setdefault(p.category)
    return list(seen)


def _warmup(cfg: BenchConfig, lm: LoadedModel, matrix: list[Variant], plain, ids, console) -> None:
    if not cfg.warmup:
        return
    n = min(16, cfg.max_new_tokens)
    with console.status(f"warming up {lm.label} ({cfg.warmup}× each method on one prompt)…"):
        for _ in range(cfg.warmup):
            _run_method(lm.model, ids, plain, n, cfg.seed)
            for v in matrix:
                try:
                    if v.kind == "peer":
                        _run_peer(v.runner, ids, n)
                    else:
                        _run_method(lm.model, ids, v.runner, n, cfg.seed)
                except Exception:  # reported when measured
                    pass


def _measure(cfg, lm, todo, plain, ids_of, results: ResultsFile, console, on_line, notes: list[str]) -> int:
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prompts = {p.id: p for _, p, _ in todo}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task(lm.label, total=len(todo))
        disabled: set[str] = set()
        measured = 0
        for r, p, v in todo:
            if v.key in disabled:
                bar.advance(task)
                continue
            bar.update(task, description=escape(f"{lm.label} · {v.key} · {p.category} · repeat {r + 1}"))
            line = measure_line(v, lm.model, prompts[p.id], ids_of[p.id], r, cfg, plain)
            line["model"] = lm.label
            if line.pop("user_error", False):   # skip this method for the rest of the run, say why once
                disabled.add(v.key)
                notes.append(f"{v.key}: skipped — {line['error']}")
                console.print(f"[yellow]note:[/yellow] {escape(notes[-1])}")
                bar.advance(task)
                continue
            measured += 1
            line["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            results.append(line)
            if line.get("error"):
                console.print(f"[red]error:[/red] {escape(v.key)} on {p.id}: {escape(line['error'])}")
            elif not line["exact"] and v.lossless:
                console.print(f"[bold red]EXACTNESS FAILURE:[/bold red] lossless method {escape(v.key)} differs from "
                              f"plain greedy on {p.id} at token {line['first_diff']} "
                              f"(plain {line['differs']['plain']} vs {line['differs']['method']})")
            if on_line is not None:
                on_line(line)
            bar.advance(task)
    return measured


def config_dict(cfg: BenchConfig) -> dict:
    d = asdict(cfg)
    d["out"] = str(cfg.out)
    return d

