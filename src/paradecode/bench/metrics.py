"""Pure functions that turn measured lines into Spec-Bench figures, plus a peak-RSS sampler.

Vocabulary (see docs/benchmark.md):

* a **line** is one measurement: one prompt × one method × one repeat, with the
  paired plain-decoding run made just before it in the same process (ABAB);
* **speedup** of a group of prompts = (Σ tokens / Σ wall of the method) /
  (Σ tokens / Σ wall of the paired plain runs), where each prompt contributes
  the median wall time over its repeats;
* **MAT** = Σ accepted lengths / number of target calls (prefill excluded);
* **calls per token** = Σ target model calls / Σ new tokens (prefill included);
* **exactness** = share of lines whose tokens equal the paired plain greedy run;
* **draft share** = Σ draft time / Σ wall time;
* **decode-phase speedup** = the speedup with each run's prompt phase (the
  prefill call that yields the first token; a peer's time to its first token)
  taken out of its wall time: Σ tokens / Σ (wall − prefill), method over plain.
  Both encode the same prompt with the same kind of call, so this is the
  speedup of the part parallel decoding changes; a short answer to a long
  prompt dilutes the end-to-end figure with that shared cost.
"""

from __future__ import annotations

import statistics
import threading
from collections import defaultdict
from typing import Any, Iterable, Sequence


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ, or None if identical.

    A length mismatch counts as a difference at the end of the shorter one:
    ``first_difference([1, 2], [1, 2, 3]) == 2``.
    """
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else 0.0


def _median_or_none(xs: Iterable[float | None]) -> float | None:
    """Median of ``xs``, or None when any is missing (older lines, peers that do not report it)."""
    xs = list(xs)
    return None if not xs or any(x is None for x in xs) else statistics.median(xs)


def per_prompt(lines: Iterable[dict]) -> list[dict]:
    """Collapse repeats: one row per (model, method, prompt) with medians of wall times.

    Token counts and call counts are deterministic for greedy decoding, so
    they come from the first repeat; times are medians over repeats.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for ln in lines:
        if ln.get("error"):
            continue
        groups[(ln["model"], ln["method"], ln["prompt_id"])].append(ln)
    rows = []
    for (model, method, pid), lns in groups.items():
        lns.sort(key=lambda x: x["repeat"])
        first = lns[0]
        run = first["run"]
        rows.append({
            "model": model, "method": method, "prompt_id": pid, "category": first["category"],
            "kind": first.get("kind", "method"), "repeats": len(lns),
            "tokens": run["new_tokens"], "wall": _median(x["run"]["wall"] for x in lns),
            "plain_tokens": first["plain"]["new_tokens"], "plain_wall": _median(x["plain"]["wall"] for x in lns),
            "draft_time": _median(x["run"].get("draft", 0.0) for x in lns),
            "prefill": _median_or_none(x["run"].get("prefill") for x in lns),
            "plain_prefill": _median_or_none(x["plain"].get("prefill") for x in lns),
            "model_calls": run.get("model_calls"), "accepted_sum": run.get("accepted_sum"),
            "accepted_count": run.get("accepted_count"), "histogram": run.get("accepted_histogram") or {},
            "exact": all(x["exact"] for x in lns), "rss_peak_mb": max(x.get("rss_peak_mb", 0.0) for x in lns),
            "rss_delta_mb": max(x.get("rss_delta_mb", 0.0) for x in lns),
            "first_diff": next((x["first_diff"] for x in lns if not x["exact"]), None),
        })
    return rows


def aggregate(rows: Sequence[dict]) -> dict[str, Any]:
    """Figures for a group of per-prompt rows (one method, any set of prompts)."""
    tok = sum(r["tokens"] for r in rows)
    wall = sum(r["wall"] for r in rows)
    ptok = sum(r["plain_tokens"] for r in rows)
    pwall = sum(r["plain_wall"] for r in rows)
    tps = tok / wall if wall > 0 else 0.0
    ptps = ptok / pwall if pwall > 0 else 0.0
    out: dict[str, Any] = {
        "prompts": len(rows), "tokens": tok, "tokens_per_s": tps, "plain_tokens_per_s": ptps,
        "speedup": tps / ptps if ptps > 0 else None,
        "exactness": sum(r["exact"] for r in rows) / len(rows) if rows else None,
        "rss_peak_mb": max((r["rss_peak_mb"] for r in rows), default=0.0),
        "rss_delta_mb": max((r["rss_delta_mb"] for r in rows), default=0.0),
        "draft_share": sum(r["draft_time"] for r in rows) / wall if wall > 0 else 0.0,
        "mat": None, "calls_per_token": None, "decode_speedup": None,
    }
    if rows and all(r.get("prefill") is not None and r.get("plain_prefill") is not None for r in rows):
        dwall = sum(r["wall"] - r["prefill"] for r in rows)
        pdwall = sum(r["plain_wall"] - r["plain_prefill"] for r in rows)
        if dwall > 0 and pdwall > 0 and ptok:
            out["decode_speedup"] = (tok / dwall) / (ptok / pdwall)
    if rows and all(r["accepted_count"] for r in rows):
        out["mat"] = sum(r["accepted_sum"] for r in rows) / sum(r["accepted_count"] for r in rows)
    if rows and all(r["model_calls"] is not None for r in rows) and tok:
        out["calls_per_token"] = sum(r["model_calls"] for r in rows) / tok
    return out


def histogram(rows: Iterable[dict]) -> dict[int, int]:
    """Sum the accepted-length histograms of several rows."""
    total: dict[int, int] = defaultdict(int)
    for r in rows:
        for k, v in r["histogram"].items():
            total[int(k)] += int(v)
    return dict(sorted(total.items()))


def repeat_range(lines: Iterable[dict]) -> tuple[float, float] | None:
    """(lowest, highest) speedup of a group of lines computed one repeat at a time; None for one repeat.

    The headline speedup takes each prompt's median over repeats; this says how
    far the repeats themselves were apart (a shared machine's noise).
    """
    by_repeat: dict[int, list[dict]] = defaultdict(list)
    for ln in lines:
        if not ln.get("error"):
            by_repeat[ln["repeat"]].append(ln)
    if len(by_repeat) < 2:
        return None
    speedups = [s for s in (aggregate(per_prompt(lns))["speedup"] for lns in by_repeat.values()) if s is not None]
    return (min(speedups), max(speedups)) if speedups else None


def summarise(lines: Iterable[dict], categories: Sequence[str]) -> dict[str, dict]:
    """{model: {method: {"overall": figs, "categories": {cat: figs}, "kind", "histogram", "failures"}}}.

    Figures carry ``speedup_range``: see :func:`repeat_range`."""
    lines = list(lines)
    rows = per_prompt(lines)
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["model"], r["method"])].append(r)
    lines_of: dict[tuple, list[dict]] = defaultdict(list)
    for ln in lines:
        lines_of[(ln["model"], ln["method"])].append(ln)
    out: dict[str, dict] = defaultdict(dict)
    for (model, method), rs in by.items():
        lns = lines_of[(model, method)]
        cats = {c: aggregate([r for r in rs if r["category"] == c]) for c in categories
                if any(r["category"] == c for r in rs)}
        for c, figs in cats.items():
            figs["speedup_range"] = repeat_range(ln for ln in lns if ln["category"] == c)
        overall = aggregate(rs)
        overall["speedup_range"] = repeat_range(lns)
        out[model][method] = {
            "kind": rs[0]["kind"], "overall": overall, "categories": cats, "histogram": histogram(rs),
            "failures": [{"prompt_id": r["prompt_id"], "first_diff": r["first_diff"]} for r in rs if not r["exact"]],
        }
    return dict(out)


class PeakRSS:
    """Sample this process's resident memory in a background thread; ``peak_mb`` after the block.

    ``with PeakRSS() as m: work()`` → ``m.peak_mb`` (process peak) and ``m.delta_mb``
    (peak above the process's memory when the block started). Sampling every 20 ms
    costs well under 1% of a core.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:  # pragma: no cover - psutil is a dependency
            self._proc = None

    def _rss(self) -> int:
        return self._proc.memory_info().rss if self._proc is not None else 0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def delta_mb(self) -> float:
        """Peak minus the resident memory at the start of the block: what the run itself added."""
        return max(0, self.peak - self.start) / 2**20
