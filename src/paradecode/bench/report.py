"""The benchmark report: JSON, a Markdown table and PNG plots, naming the machine and the command."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

from .metrics import summarise


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch threads, the compiled kernels' paths and library versions."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"paradecode": _version("paradecode"), "torch": torch.__version__,
                "transformers": _version("transformers"), "python": platform.python_version()}
    for extra in ("llama_cpp_python",):
        v = _version(extra.replace("_", "-"))
        if v:
            versions[extra.replace("_python", "")] = v
    from ..models import kernels

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "kernels": kernels.describe(), "platform": platform.platform(), "versions": versions}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def build_report(lines: Sequence[dict], *, cfg, variants: dict[str, dict], notes: list[str],
                 model_names: dict[str, str], categories: list[str], computed: int) -> dict[str, Any]:
    from .runner import config_dict

    summary = summarise(lines, categories)
    failures = []
    for model, methods in summary.items():
        for key, s in methods.items():
            if variants.get(key, {}).get("lossless"):
                failures += [{"model": model, "method": key, **f} for f in s["failures"]]
    ok = {(ln["model"], ln["method"], ln["prompt_id"], ln["repeat"]) for ln in lines if not ln.get("error")}
    errors = [{"model": ln["model"], "method": ln["method"], "prompt_id": ln["prompt_id"], "error": ln["error"]}
              for ln in lines if ln.get("error")
              and (ln["model"], ln["method"], ln["prompt_id"], ln["repeat"]) not in ok]   # not fixed by a rerun
    return {
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": cfg.command,
        "machine": machine_info(),
        "config": config_dict(cfg),
        "measurement_key": cfg.measurement_key(),
        "models": model_names,
        "categories": categories,
        "variants": variants,
        "lines": len(lines),
        "lines_measured_now": computed,
        "notes": notes,
        "exactness_failures": failures,
        "errors": errors,
        "results": summary,
    }


# -- Markdown ------------------------------------------------------------------------

def _fmt(x, spec: str, suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def _category_table(methods: dict[str, dict], cats: list[str], cell) -> list[str]:
    """A Markdown table: one row per method, one column per category plus overall; ``cell(figures or None)``."""
    rows = ["| method | " + " | ".join(cats) + " | overall |", "|---" * (len(cats) + 2) + "|"]
    for key in _order(methods):
        s = methods[key]
        cells = [cell(s["overall"] if c == "overall" else s["categories"].get(c)) for c in cats + ["overall"]]
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    return rows


def _order(methods: dict[str, dict]) -> list[str]:
    return sorted(methods, key=lambda k: (methods[k]["kind"] == "peer", k))


def markdown(report: dict) -> str:
    m = report["machine"]
    v = m["versions"]
    cfg = report["config"]
    cats = report["categories"]
    out = ["# paradecode benchmark", "",
           f"- **Command:** `{report['command'] or '(API call)'}`",
           f"- **Machine:** {m['cpu']}, {m['cores']} logical cores, torch threads {m['torch_threads']}"
           + (f", kernels: {m['kernels']}" if m.get("kernels") else "") + f" ({m['platform']})",
           "- **Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items()),
           f"- **Settings:** greedy, batch 1, max new tokens {cfg['max_new_tokens']}, repeats {cfg['repeats']}, "
           f"warm-up {cfg['warmup']}, dtype {cfg['dtype']}, backend {cfg['backend']}; "
           f"{report['lines']} measured lines; created {report['created']}",
           ""]
    if report["exactness_failures"]:
        out += ["## ⚠ EXACTNESS FAILURES", "",
                "Lossless methods whose output differed from plain greedy decoding:", "",
                "| model | method | prompt | first differing token |", "|---|---|---|---|"]
        out += [f"| {f['model']} | {f['method']} | {f['prompt_id']} | {f['first_diff']} |"
                for f in report["exactness_failures"]]
        out.append("")
    for model, methods in report["results"].items():
        name = report["models"].get(model, model)
        out += [f"## {name}" + (f" (`{model}`)" if model not in ("default", name) else ""), "",
                "Speedup over paradecode's plain decoding in the same run / MAT (tokens per target call).", "",
                *_category_table(methods, cats, lambda f: "" if f is None else
                                 f"{_fmt(f['speedup'], '.2f', '×')} / {_fmt(f['mat'], '.2f')}")]
        if any(f.get("decode_speedup") is not None for s in methods.values()
               for f in [s["overall"], *s["categories"].values()]):
            out += ["", "Decode-phase speedup: the same runs with each one's prompt phase (the prefill that "
                    "yields the first token, the same call for every method) taken out of its wall time.", "",
                    *_category_table(methods, cats, lambda f: _fmt((f or {}).get("decode_speedup"), ".2f", "×"))]
        out += ["", "Overall figures:", "",
                "| method | kind | tokens/s | plain tokens/s | speedup | speedup per repeat (min–max) | MAT | "
                "calls/token | exactness | draft share | peak RSS MB (+ added by the run) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in _order(methods):
            s = methods[key]
            f = s["overall"]
            lossless = report["variants"].get(key, {}).get("lossless")
            exact = _fmt(None if f["exactness"] is None else 100 * f["exactness"], ".0f", "%")
            if lossless and f["exactness"] is not None and f["exactness"] < 1:
                exact = f"**{exact} ⚠**"
            kind = s["kind"] + (" (lossless)" if lossless else "")
            rng = f.get("speedup_range")
            rng = "—" if rng is None else f"{rng[0]:.2f}–{rng[1]:.2f}×"
            out.append(f"| {key} | {kind} | {f['tokens_per_s']:.1f} | {f['plain_tokens_per_s']:.1f} | "
                       f"{_fmt(f['speedup'], '.2f', '×')} | {rng} | {_fmt(f['mat'], '.2f')} | "
                       f"{_fmt(f['calls_per_token'], '.2f')} | {exact} | "
                       f"{_fmt(100 * f['draft_share'], '.0f', '%')} | "
                       f"{f['rss_peak_mb']:.0f} (+{f['rss_delta_mb']:.0f}) |")
        out.append("")
    if report["errors"]:
        out += ["## Errors", ""] + [f"- {e['method']} on {e['prompt_id']} ({e['model']}): {e['error']}"
                                    for e in report["errors"]] + [""]
    if report["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    plots = report.get("plots") or []
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    out += ["Definitions: see docs/benchmark.md. Peers have no MAT or call counts (their internals are not "
            "instrumented); their exactness is informational (other kernels may break float ties differently)."]
    return "\n".join(out) + "\n"


# -- plots ---------------------------------------------------------------------------

def plot(report: dict, out: Path) -> list[str]:
    """Write the PNG plots next to the report; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    cats = report["categories"]
    for mi, (model, methods) in enumerate(report["results"].items()):
        suffix = "" if mi == 0 else f"-{mi}"
        keys = _order(methods)
        if not keys:
            continue
        # speedup per category per method: grouped bars
        groups = len(cats) + 1
        fig, ax = plt.subplots(figsize=(min(18, max(7, groups * (0.22 * len(keys) + 0.4))), 4.5))
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            ys = [(methods[key]["categories"].get(c) or {}).get("speedup") or 0 for c in cats]
            ys.append(methods[key]["overall"]["speedup"] or 0)
            ax.bar([j + i * width for j in range(len(cats) + 1)], ys, width, label=key)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats) + 1)], cats + ["overall"], rotation=30,
                      ha="right")
        ax.set_ylabel("speedup over plain (×)")
        ax.set_title(f"Speedup per category — {report['models'].get(model, model)}")
        files.append(_save(fig, ax, out / f"speedup{suffix}.png", ncol=2))
        # accepted-length histograms (paradecode methods only)
        hkeys = [k for k in keys if methods[k]["histogram"]]
        if hkeys:
            fig, ax = plt.subplots(figsize=(6.5, 4))
            for key in hkeys:
                h = {int(k): v for k, v in methods[key]["histogram"].items()}   # JSON keys are strings
                total = sum(h.values())
                xs = sorted(h)
                ax.plot(xs, [h[x] / total for x in xs], marker="o", label=key)
            ax.set_yscale("log")                 # the tail (long accepted runs) is what differs
            ax.set_xlabel("tokens produced per target call")
            ax.set_ylabel("share of calls (log)")
            ax.set_title("Accepted lengths")
            files.append(_save(fig, ax, out / f"accepted{suffix}.png"))
        # tokens/s vs a swept option (draft length)
        sweeps: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for key, v in report["variants"].items():
            if v.get("sweep") and key in methods:
                sweeps.setdefault((v["name"], v["sweep"][0]), []).append((v["sweep"][1], key))
        if sweeps:
            fig, ax = plt.subplots(figsize=(6.5, 4))
            plain_tps = []
            for (name_, option), points in sweeps.items():
                points.sort(key=lambda p: _num(p[0]))
                ax.plot([_num(p[0]) for p in points], [methods[k]["overall"]["tokens_per_s"] for _, k in points],
                        marker="o", label=f"{name_} ({option})")
                plain_tps += [methods[k]["overall"]["plain_tokens_per_s"] for _, k in points]
            ax.axhline(sum(plain_tps) / len(plain_tps), color="black", ls="--", lw=0.8, label="plain")
            ax.set_xlabel("option value (draft length)")
            ax.set_ylabel("tokens/s")
            ax.set_title("Tokens/s vs draft length")
            files.append(_save(fig, ax, out / f"sweep{suffix}.png"))
    return files


def _save(fig, ax, path: Path, ncol: int = 1) -> str:
    """Legend, layout, write the PNG, free the figure; return the file name."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7, ncol=ncol)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _num(x: str) -> float:
    try:
        return float(x)
    except ValueError:
        return 0.0


def write_report(report: dict, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plot(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))
