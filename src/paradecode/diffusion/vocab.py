"""A small fixed vocabulary for the synthetic diffusion tasks.

Every token is a whole word (no sub-word merges): special tokens, list items
(letters ``a``–``p``), digits, operation names, separators and the words of
the templated-text task. ``encode``/``decode`` split and join on spaces.
"""

from __future__ import annotations

from ..errors import UserError

SPECIALS = ("<pad>", "<mask>", "<eos>", "<bos>")
ITEMS = tuple("abcdefghijklmnop")                       # list elements, sortable
DIGITS = tuple("0123456789")
OPS = ("copy", "reverse", "sort", "insert", "remove", "replace", "shuffle", "latin", "text")
SEPARATORS = (":", "|", "=", ".")
WORDS = ("name", "city", "food", "lives", "in", "and", "likes",
         "ann", "bob", "eve", "tom", "rome", "oslo", "lima", "kyiv", "rice", "fish", "soup", "cake")
TOKENS = SPECIALS + ITEMS + DIGITS + OPS + SEPARATORS + WORDS


class Vocab:
    """Word-level tokenizer with ``<mask>``, ``<pad>``, ``<eos>`` and ``<bos>``."""

    def __init__(self, tokens: tuple[str, ...] = TOKENS):
        self.tokens = tokens
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.pad_id, self.mask_id, self.eos_id, self.bos_id = (self.ids[t] for t in SPECIALS)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            if w not in self.ids:
                raise UserError(f"unknown token {w!r} for the diffusion task vocabulary",
                                "use list items a-p, digits, operation names and the task words (see docs/diffusion.md)")
            out.append(self.ids[w])
        return out

    def decode(self, ids, *, strip: bool = True) -> str:
        words = []
        for i in ids:
            t = self.tokens[int(i)]
            if strip and t == "<eos>":
                break
            if strip and t in ("<pad>", "<bos>"):
                continue
            words.append(t)
        return " ".join(words)


VOCAB = Vocab()
