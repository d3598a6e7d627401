"""Spec-Bench-style benchmark: methods × task categories, with peers side by side.

``paradecode bench`` is the CLI; :func:`run_benchmark` the API. Layout:

* ``prompts``  — the shipped prompt suites (``suites/*.jsonl``) and their loader;
* ``runner``   — the measurement loop (ABAB pairs, warm-up, resumable JSONL);
* ``peers``    — transformers and llama.cpp, measured on the same prompts;
* ``metrics``  — pure functions from measured lines to speedup, MAT, exactness;
* ``report``   — Markdown, JSON and PNG plots naming the machine and command.
"""

from .prompts import CATEGORIES, BenchPrompt, load_prompts
from .runner import BenchConfig, LoadedModel, run_benchmark

__all__ = ["CATEGORIES", "BenchPrompt", "load_prompts", "BenchConfig", "LoadedModel", "run_benchmark"]
