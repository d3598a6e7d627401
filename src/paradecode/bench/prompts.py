"""The prompt suites shipped with paradecode, in the Spec-Bench categories (+ code).

Each ``suites/<category>.jsonl`` line is one prompt::

    {"id": "qa-03", "category": "qa", "messages": [{"role": "user", "content": "..."}],
     "source": "written for paradecode", "licence": "Apache-2.0"}

``messages`` is a chat (several turns for multi-turn conversation; the model
answers the last user turn). A prompt may instead carry ``text`` (raw
completion, no chat template) or ``ids`` (token ids, for tests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Sequence

from ..errors import UserError

# Spec-Bench's six categories, plus code completion (HumanEval) and code editing.
CATEGORIES = ("multi_turn", "translation", "summarization", "qa", "math", "rag", "code", "code_edit")


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    source: str
    licence: str
    messages: tuple = ()            # chat turns (dicts with role/content)
    text: str | None = None         # raw completion prompt
    ids: tuple[int, ...] = ()       # token ids (tests, tokenizer-free models)
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchPrompt":
        missing = [k for k in ("id", "category", "source", "licence") if not d.get(k)]
        if missing:
            raise ValueError(f"prompt {d.get('id', '?')} lacks {', '.join(missing)}")
        if not (d.get("messages") or d.get("text") or d.get("ids")):
            raise ValueError(f"prompt {d['id']} has no messages, text or ids")
        known = {"id", "category", "source", "licence", "messages", "text", "ids"}
        return cls(id=d["id"], category=d["category"], source=d["source"], licence=d["licence"],
                   messages=tuple(d.get("messages") or ()), text=d.get("text"), ids=tuple(d.get("ids") or ()),
                   meta={k: v for k, v in d.items() if k not in known})

    def as_text(self) -> str:
        """All the prompt's text in one string (for tokenizer-free models)."""
        if self.text is not None:
            return self.text
        return "\n".join(m["content"] for m in self.messages)

    def encode(self, model) -> list[int]:
        """Prompt token ids for ``model`` (chat template when the prompt is a chat)."""
        from ..api import encode_prompt

        if self.ids:
            return encode_prompt(model, list(self.ids))
        if model.tokenizer is None:
            return text_to_ids(self.as_text(), model.vocab_size)
        if self.text is not None:
            return encode_prompt(model, self.text)
        return encode_prompt(model, [dict(m) for m in self.messages])


def text_to_ids(text: str, vocab_size: int, limit: int = 48) -> list[int]:
    """A stand-in tokenizer for tokenizer-free test models: bytes folded into the vocabulary.

    Keeps the last ``limit`` ids so tiny models with short contexts fit. Ids
    0-2 (pad, bos, eos of the tiny models) are never produced.
    """
    ids = [3 + b % (vocab_size - 3) for b in text.encode("utf-8")]
    return ids[-limit:] or [3]


def suite_path(category: str):
    return resources.files("paradecode.bench") / "suites" / f"{category}.jsonl"


def load_suite(category: str) -> list[BenchPrompt]:
    if category not in CATEGORIES:
        raise UserError(f"unknown category {category!r}", f"choose from: {', '.join(CATEGORIES)}",
                        field="categories")
    out = []
    for n, line in enumerate(suite_path(category).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            p = BenchPrompt.from_dict(json.loads(line))
            if p.category != category:
                raise ValueError(f"{category}.jsonl line {n}: category {p.category!r}")
            out.append(p)
    return out


def load_prompts(categories: Sequence[str] | None = None, num_prompts: int | None = None) -> list[BenchPrompt]:
    """The first ``num_prompts`` prompts of each category (all when None), category by category."""
    out: list[BenchPrompt] = []
    for c in categories or CATEGORIES:
        prompts = load_suite(c)
        out.extend(prompts[:num_prompts] if num_prompts else prompts)
    return out
