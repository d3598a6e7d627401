"""Quality-vs-speed benchmark of the diffusion samplers on the ParallelBench-style tasks.

For every task and every sampler configuration: exact-match accuracy (validity
for shuffle / latin), mean NFE, median wall time per instance, and the share of
outputs token-identical to one-token-per-step decoding. Writes a JSON file, a
Markdown report and one Pareto plot (accuracy vs NFE) per task.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .samplers import build_sampler
from .tasks import LIST_TASKS, TASKS, eval_instances
from .train import encode_instance
from .vocab import VOCAB

UNIQUE_LIST_TASKS = tuple(t for t in LIST_TASKS if TASKS[t].unique_answer)


@dataclass(frozen=True)
class Setting:
    label: str
    sampler: str
    options: tuple[tuple[str, object], ...] = ()


def default_settings() -> list[Setting]:
    S = Setting
    out = [S("one-per-step", "llada"), S("llada steps=G/2", "llada", (("steps", -2),)),
           S("llada steps=G/4", "llada", (("steps", -4),)),
           S("random remask", "llada", (("remasking", "random"),))]
    out += [S(f"threshold {t}", "threshold", (("threshold", t),)) for t in (0.5, 0.7, 0.8, 0.9, 0.99)]
    out += [S(f"factor {f}", "factor", (("factor", f),)) for f in (0.5, 1.0, 2.0, 4.0)]
    out += [S(f"threshold 0.9 block=G/2 {c}", "threshold", (("threshold", 0.9), ("block_length", -2), ("cache", c)))
            for c in ("none", "prefix", "dual")]
    out += [S("prophet", "prophet"), S("localleap", "localleap"), S("learn2pd", "learn2pd"),
            S("learn2pd p>0.7", "learn2pd", (("threshold", 0.7),)),
            S("freedave K=4", "freedave", (("drafts", 4),)), S("freedave K=8", "freedave", (("drafts", 8),))]
    return out


def _resolve(options, G: int) -> dict:
    """Negative numbers for steps/block_length mean G / |n| (the answer length differs per task)."""
    return {k: (G // -v if isinstance(v, int) and v < 0 and k in ("steps", "block_length") else v) for k, v in options}


def run_task(model, task: str, settings: list[Setting], n: int, seed: int = 0, progress=None) -> list[dict]:
    spec = TASKS[task]
    G = spec.gen_length
    instances = [(p, encode_instance(p, a, G)[0]) for p, a in eval_instances(task, n, seed)]
    reference = None
    rows = []
    for st in settings:
        sampler = build_sampler(st.sampler, _resolve(st.options, G))
        correct, nfes, secs, outs = 0, [], [], []
        for words, ids in instances:
            r = sampler.decode(model, ids, G)
            out = r.answer[0].tolist()
            outs.append(out)
            correct += spec.check(words, VOCAB.decode(out).split())
            nfes.append(r.nfe)
            secs.append(r.seconds)
            if progress:
                progress()
        if reference is None:
            reference = outs            # the first setting is one token per step
        rows.append({"task": task, "setting": st.label, "sampler": st.sampler, "options": _resolve(st.options, G),
                     "accuracy": 100.0 * correct / n, "nfe": statistics.mean(nfes),
                     "ms": 1000 * statistics.median(secs),
                     "identical": 100.0 * sum(a == b for a, b in zip(outs, reference)) / n,
                     "gen_length": G, "n": n})
    return rows


def run(model, tasks=tuple(TASKS), n: int = 50, settings: list[Setting] | None = None, seed: int = 0,
        progress: bool = True) -> list[dict]:
    settings = settings or default_settings()
    assert settings[0].sampler == "llada" and not settings[0].options, "first setting must be one-per-step"
    from rich.progress import Progress

    rows = []
    with Progress(disable=not progress) as bar:
        job = bar.add_task("diffusion bench", total=len(tasks) * len(settings) * n)
        for task in tasks:
            rows += run_task(model, task, settings, n, seed, progress=lambda: bar.advance(job))
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (nfe, accuracy) not dominated by another (fewer-or-equal NFE and higher-or-equal
    accuracy, one strictly), ordered by NFE."""
    idx = []
    for i, (n, a) in enumerate(points):
        if not any((n2 <= n and a2 >= a) and (n2 < n or a2 > a) for n2, a2 in points):
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for sampler in dict.fromkeys(r["sampler"] for r in rs):
            pts = [r for r in rs if r["sampler"] == sampler]
            ax.scatter([r["nfe"] for r in pts], [r["accuracy"] for r in pts], label=sampler, s=28)
        front = pareto_front([(r["nfe"], r["accuracy"]) for r in rs])
        ax.plot([rs[i]["nfe"] for i in front], [rs[i]["accuracy"] for i in front], "k--", lw=1, label="Pareto front")
        ax.set_xlabel("NFE (model calls per answer)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{task}: accuracy vs NFE (gen_length {rs[0]['gen_length']}, n={rs[0]['n']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = Path(out_dir) / f"diffusion_pareto_{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown(rows: list[dict], machine: str) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    get = {(r["task"], r["setting"]): r for r in rows}
    lt = [t for t in UNIQUE_LIST_TASKS if t in tasks]
    ref = settings[0]
    ref_nfe = statistics.mean(get[(t, ref)]["nfe"] for t in lt) if lt else float("nan")
    ref_acc = statistics.mean(get[(t, ref)]["accuracy"] for t in lt) if lt else float("nan")
    lines = [f"Machine: {machine}. Greedy, batch 1, n = {rows[0]['n']} held-out instances per task. "
             "NFE = model calls per answer (a FreeDave batched verification counts once); "
             "ms = median wall time per answer; identical = share of outputs token-identical to one-per-step.",
             "", "### Summary (list tasks with one right answer: " + ", ".join(lt) + ")", "",
             "| setting | list acc % | Δ vs one-per-step | list NFE | NFE speedup | identical % | list ms "
             "| shuffle acc % | latin acc % | text acc % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in settings:
        acc = statistics.mean(get[(t, s)]["accuracy"] for t in lt)
        nfe = statistics.mean(get[(t, s)]["nfe"] for t in lt)
        ms = statistics.mean(get[(t, s)]["ms"] for t in lt)
        ident = statistics.mean(get[(t, s)]["identical"] for t in lt)
        extra = [f"{get[(t, s)]['accuracy']:.0f}" if (t, s) in get else "–" for t in ("shuffle", "latin", "text")]
        lines.append(f"| {s} | {acc:.1f} | {acc - ref_acc:+.1f} | {nfe:.2f} | {ref_nfe / nfe:.2f}x | {ident:.0f} "
                     f"| {ms:.1f} | " + " | ".join(extra) + " |")
    lines += ["", "### Per task (accuracy % / NFE)", "",
              "| setting | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for s in settings:
        lines.append(f"| {s} | " + " | ".join(f"{get[(t, s)]['accuracy']:.0f} / {get[(t, s)]['nfe']:.1f}"
                                            for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def save(rows: list[dict], out_dir: Path, machine: str, cache_rows: list[dict] | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "diffusion_results.json").write_text(json.dumps({"tasks": rows, "cache_speed": cache_rows}, indent=1))
    md = out_dir / "diffusion_table.md"
    text = markdown(rows, machine)
    if cache_rows:
        text += "\n### Cache wall-clock on a larger random-weight model (" + cache_rows[0]["model"] + ")\n\n"
        text += "| cache | median s | speedup vs none | NFE |\n|---|---|---|---|\n"
        text += "".join(f"| {r['cache']} | {r['seconds']:.2f} | {r['speedup']:.2f}x | {r['nfe']} |\n" for r in cache_rows)
    md.write_text(text)
    return {"json": out_dir / "diffusion_results.json", "markdown": md, "plots": plot(rows, out_dir)}


def machine_name() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} thread(s), shared CPU ({time.strftime('%Y-%m-%d')})"


def cache_speed(hidden: int = 256, layers: int = 4, prompt: int = 64, gen_length: int = 128, block: int = 32,
                steps: int = 32, repeats: int = 3, seed: int = 0) -> list[dict]:
    """Wall time of the three cache modes on a larger random-weight model (LLaDA-shaped, no training),
    where per-token compute — what the cache saves — dominates over per-call overhead. Same
    schedule (``steps`` low-confidence steps over ``gen_length`` in blocks of ``block``) for all
    modes; the modes are interleaved and the median of ``repeats`` is reported."""
    from .model import DiffusionShape, DiffusionTransformer

    torch.manual_seed(seed)
    shape = DiffusionShape(vocab_size=512, hidden=hidden, intermediate=hidden * 8 // 3, layers=layers,
                           heads=hidden // 64, kv_heads=hidden // 64, head_dim=64,
                           max_context=prompt + gen_length, mask_id=511, eos_id=510)
    model = DiffusionTransformer(shape).eval().requires_grad_(False)
    ids = torch.randint(0, 500, (prompt,)).tolist()
    secs: dict[str, list[float]] = {"none": [], "prefix": [], "dual": []}
    nfe = {}
    for _ in range(repeats):
        for mode in secs:
            r = build_sampler("llada", {"steps": steps, "block_length": block, "cache": mode}).decode(
                model, ids, gen_length)
            secs[mode].append(r.seconds)
            nfe[mode] = r.nfe
    base = statistics.median(secs["none"])
    return [{"cache": m, "seconds": statistics.median(s), "speedup": base / statistics.median(s), "nfe": nfe[m],
             "model": f"random {layers}x{hidden}, prompt {prompt}, gen {gen_length}, block {block}, steps {steps}"}
            for m, s in secs.items()]
