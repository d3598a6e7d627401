"""Synthetic tasks modelled on ParallelBench (Kim et al., 2025).

ParallelBench's point: tasks that are trivial one token at a time can break
under parallel unmasking when answer tokens depend on each other. The list
operations with one right answer (copy, reverse, sort, insert, remove,
replace) have nearly independent positions given the prompt; ``shuffle`` and
``latin`` have many right answers, so the per-position marginals mix
different answers and committing several positions at once can produce
duplicates — the failure the benchmark measures.

Every instance is ``(prompt words, answer words)``; a task's ``check`` decides
whether an output is correct (exact match, or validity for the tasks with
many answers). ``gen_length`` is the answer region; answers are followed by
``<eos>`` up to it.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from .vocab import ITEMS

Instance = tuple[list[str], list[str]]


@dataclass(frozen=True)
class Task:
    name: str
    gen_length: int
    sample: Callable[[random.Random], Instance]
    check: Callable[[list[str], list[str]], bool]     # (prompt words, output words) -> correct
    unique_answer: bool = True


def _items(rng: random.Random, lo: int = 4, hi: int = 8) -> list[str]:
    return rng.sample(ITEMS, rng.randint(lo, hi))


MAX_ITEMS = 8


def _layout(op: str, args: list[str], xs: list[str]) -> list[str]:
    """Fixed prompt layout ``<bos> op arg arg : x1 .. x8`` padded with ``<pad>``: list item j always
    sits at the same distance from answer slot j, so position-wise copying is easy to learn."""
    return ["<bos>", op, *args, *["<pad>"] * (2 - len(args)), ":", *xs, *["<pad>"] * (MAX_ITEMS - len(xs))]


def _list_of(prompt: list[str]) -> list[str]:
    return [w for w in prompt[prompt.index(":") + 1:] if w != "<pad>"]


def _exact(task_fn):
    def check(prompt, output):
        return output == task_fn(prompt)
    return check


# -- list operations with one right answer ------------------------------------
def _copy(rng):
    xs = _items(rng)
    return _layout("copy", [], xs), xs


def _reverse(rng):
    xs = _items(rng)
    return _layout("reverse", [], xs), xs[::-1]


def _sort(rng):
    xs = _items(rng)
    return _layout("sort", [], xs), sorted(xs)


def _insert(rng):
    xs = _items(rng)
    new = rng.choice([c for c in ITEMS if c not in xs])
    at = rng.randint(0, len(xs))
    return _layout("insert", [new, str(at)], xs), xs[:at] + [new] + xs[at:]


def _remove(rng):
    xs = _items(rng)
    old = rng.choice(xs)
    return _layout("remove", [old], xs), [x for x in xs if x != old]


def _replace(rng):
    xs = _items(rng)
    old = rng.choice(xs)
    new = rng.choice([c for c in ITEMS if c not in xs])
    return _layout("replace", [old, new], xs), [new if x == old else x for x in xs]


def _answer_of(sample_fn):
    """Exact-match checker: recompute the answer from the prompt."""
    def answer(prompt):
        op, xs = prompt[1], _list_of(prompt)
        if op == "copy":
            return xs
        if op == "reverse":
            return xs[::-1]
        if op == "sort":
            return sorted(xs)
        if op == "insert":
            at = int(prompt[3])
            return xs[:at] + [prompt[2]] + xs[at:]
        if op == "remove":
            return [x for x in xs if x != prompt[2]]
        if op == "replace":
            return [prompt[3] if x == prompt[2] else x for x in xs]
        raise ValueError(op)
    return _exact(answer)


# -- tasks with many right answers ---------------------------------------------
def _shuffle(rng):
    xs = _items(rng)
    ys = xs[:]
    while ys == xs:
        rng.shuffle(ys)
    return _layout("shuffle", [], xs), ys


def _check_shuffle(prompt, output):
    xs = _list_of(prompt)
    return sorted(output) == sorted(xs) and output != xs


_LATIN = [sq for sq in itertools.product(itertools.permutations("1234"), repeat=4)
          if all(len(set(col)) == 4 for col in zip(*sq))]          # 576 squares as row tuples


def _latin(rng):
    sq = rng.choice(_LATIN)
    rows = [list(r) for r in sq]
    answer = rows[0] + ["|"] + rows[1] + ["|"] + rows[2] + ["|"] + rows[3]
    return _layout("latin", [], rows[0]), answer


def _check_latin(prompt, output):
    if len(output) != 19 or [output[i] for i in (4, 9, 14)] != ["|"] * 3:
        return False
    rows = [output[i:i + 4] for i in (0, 5, 10, 15)]
    ok = all(sorted(r) == list("1234") for r in rows) and all(sorted(c) == list("1234") for c in zip(*rows))
    return ok and rows[0] == _list_of(prompt)


# -- templated text --------------------------------------------------------------
_SLOTS = {"name": ("ann", "bob", "eve", "tom"), "city": ("rome", "oslo", "lima", "kyiv"),
          "food": ("rice", "fish", "soup", "cake")}


def _text(rng):
    vals = {k: rng.choice(v) for k, v in _SLOTS.items()}
    order = list(_SLOTS)
    rng.shuffle(order)
    prompt = ["<bos>", "text"] + [w for k in order for w in (k, "=", vals[k])]
    return prompt, [vals["name"], "lives", "in", vals["city"], "and", "likes", vals["food"], "."]


def _check_text(prompt, output):
    vals = {prompt[i]: prompt[i + 2] for i in range(2, len(prompt), 3)}
    return output == [vals["name"], "lives", "in", vals["city"], "and", "likes", vals["food"], "."]


_exact_list = _answer_of(None)
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("copy", 10, _copy, _exact_list),
    Task("reverse", 10, _reverse, _exact_list),
    Task("sort", 10, _sort, _exact_list),
    Task("insert", 10, _insert, _exact_list),
    Task("remove", 10, _remove, _exact_list),
    Task("replace", 10, _replace, _exact_list),
    Task("shuffle", 10, _shuffle, _check_shuffle, unique_answer=False),
    Task("latin", 20, _latin, _check_latin, unique_answer=False),
    Task("text", 10, _text, _check_text),
)}
LIST_TASKS = ("copy", "reverse", "sort", "insert", "remove", "replace", "shuffle")

# training mixture: the ParallelBench tasks, weighted towards the harder ones
TRAIN_MIX = {"copy": 1.5, "reverse": 1.5, "sort": 2.0, "insert": 1.0, "remove": 1.0, "replace": 1.0,
             "shuffle": 0.7, "latin": 0.7, "text": 0.3}

# held-out instances come from a seed range training never uses
TRAIN_SEED_BASE, EVAL_SEED_BASE = 0, 10_000_000


def eval_instances(task: str, n: int, seed: int = 0) -> list[Instance]:
    """``n`` held-out instances of ``task`` (deterministic, disjoint seeds from training)."""
    rng = random.Random(EVAL_SEED_BASE + 7919 * seed + hash_task(task))
    return [TASKS[task].sample(rng) for _ in range(n)]


def hash_task(task: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(task))   # stable across runs (unlike hash())


def format_prompt(text: str) -> list[str]:
    """User text such as ``"sort : d a c b"`` or ``"insert k 2 : a b c"`` → the model's fixed prompt
    layout (adds ``<bos>`` and the ``<pad>`` slots). ``text ...`` prompts are passed through."""
    words = [w for w in text.split() if w not in ("<bos>", "<pad>")]
    if not words:
        raise UserError("empty prompt", 'write e.g. "sort : d a c b"')
    if words[0] == "text" or ":" not in words:
        return ["<bos>", *words]
    i = words.index(":")
    op, args, xs = words[0], words[1:i], words[i + 1:]
    if len(args) > 2 or len(xs) > MAX_ITEMS:
        raise UserError(f"prompt {text!r} does not fit the task layout",
                        f"use at most 2 arguments and {MAX_ITEMS} list items")
    return _layout(op, args, xs)
