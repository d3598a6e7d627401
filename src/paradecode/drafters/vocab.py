"""A draft's LM head over part of the vocabulary (FR-Spec).

FR-Spec (Zhao et al. 2025, "FR-Spec: Accelerating Large-Vocabulary Language
Models via Frequency-Ranked Speculative Sampling") lets the draft score only
the vocabulary's most frequent tokens: a draft step's LM head is a large share
of its cost (on the default model the int4 twin's int8 head, 49,152 x 576, is
about a fifth of its one-token step), while the tokens a model writes come
mostly from a small part of its vocabulary. Only the draft is restricted; the
target verifies over the whole vocabulary, so the output is unchanged: a token
the draft cannot propose only ends its draft early. When sampling, the draft's
q is zero outside its vocabulary and the verifier's residual max(0, p - q)
still covers every token, so the target distribution stays exact.

Which tokens. FR-Spec ranks the vocabulary by counts over a corpus; without
data to count, the token ids' own order serves: a BPE vocabulary lists its
merges in the order they were learned, most frequent pair first (on the
default model the first 16,384 ids cover 94% of the tokens its answers to the
benchmark prompts use). To that prefix each request adds the tokens of its
prompt, the model's end-of-sequence tokens, and every token the target
commits: copies of the input and words the answer repeats stay proposable
(98% of those answers' tokens with the prompt's, at 16,384).

Cost. The prefix is a view of the draft's packed head (its first n / 16
panels: no copy); the added tokens' rows are dequantized once into a small
float32 matrix and scored with one extra product.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..models.quant import F32_CHANNELS as CHANNELS     # output channels per panel of the packed heads


class DraftVocab:
    """The tokens a draft model scores: ids below ``size``, plus those :meth:`add` brings in (one request)."""

    def __init__(self, model, size: int, head):
        self.model = model
        self.size = size                       # ids [0, size) are scored through ``head``
        self.head = head                       # the head of those ids: a view of the model's own
        self.vocab_size = model.vocab_size
        self._known: set[int] = set()          # ids >= size added since
        self._index: torch.Tensor | None = None    # (n,) long: those ids, in the order added
        self._rows: torch.Tensor | None = None     # (n, H) float32: their head rows

    @classmethod
    def build(cls, model, size: int) -> "DraftVocab | None":
        """A vocabulary of ``model``'s first ``size`` ids (rounded down to a multiple of 16); None when it
        would be the whole vocabulary, or when the model's head has no prefix view (then the draft scores
        every token)."""
        size -= size % CHANNELS
        head_prefix = getattr(model, "head_prefix", None)
        if size <= 0 or size >= model.vocab_size or head_prefix is None:
            return None
        head = head_prefix(size)
        return None if head is None else cls(model, size, head)

    def __len__(self) -> int:
        return self.size + len(self._known)

    def __contains__(self, token: int) -> bool:
        return token < self.size or token in self._known

    def add(self, tokens: Iterable[int]) -> None:
        """Make ``tokens`` proposable from now on (the ones already in do not count twice)."""
        new = list(dict.fromkeys(t for t in tokens if t >= self.size and t not in self._known))
        if not new:
            return
        ids = torch.tensor(new)
        rows = self.model.lm_head.rows(ids).float()                  # (n, H)
        self._known.update(new)
        self._index = ids if self._index is None else torch.cat([self._index, ids])
        self._rows = rows if self._rows is None else torch.cat([self._rows, rows])

    def logits(self, h: torch.Tensor, proj: Callable) -> torch.Tensor:
        """Logits (R, V) of the final norm's output h (R, H): -inf outside this vocabulary. ``proj`` is the
        model's product (``linear(x, w)``)."""
        out = torch.full((h.shape[0], self.vocab_size), float("-inf"))
        out[:, :self.size] = proj(h, self.head)
        if self._rows is not None:
            out[:, self._index] = h.float() @ self._rows.T
        return out
