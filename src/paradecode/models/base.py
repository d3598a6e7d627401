"""The one interface every decoding method uses to talk to a causal LM.

A call feeds *new* tokens after whatever the cache already holds::

    logits = model.forward(cache, input_ids, positions, attn_mask)

* ``input_ids``  (B, T) long — the new tokens;
* ``positions``  (B, T) long — their RoPE positions (explicit, so tree nodes at
  the same depth share a position and left-padded rows start at 0);
* ``attn_mask``  (B, T, T) bool or None — which new tokens each new token may
  see (True = may attend). ``None`` means causal. Every new token always sees
  every valid cached token; the mask only governs the new block, which is what
  token trees and Jacobi windows need;
* ``input_valid`` (B, T) bool or None — False marks padding that no later
  token may attend to (batched prompts of different lengths);
* ``logits_for`` — ``None`` for logits at every new position, or an index
  tensor (T',) selecting the positions that need them (prefill only needs
  the last);

and returns float32 logits (B, T or T', V). The new tokens' keys and values
are appended to the cache at slots ``cache.length ... cache.length + T - 1``.

The cache (:class:`KVCache`) has explicit slots: ``rollback(n)`` forgets
everything from slot ``n`` on (rejected draft tokens cost nothing), and
``compact(start, keep)`` moves the slots ``start + keep[i]`` to ``start + i``
(keep only the accepted root-to-leaf path of a verified tree).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    vocab_size: int
    num_layers: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    dtype: str
    backend: str
    extra: dict = field(default_factory=dict, compare=False)


class KVCache(ABC):
    """Key/value cache with explicit slots, shared length across the batch."""

    batch_size: int
    capacity: int

    @property
    @abstractmethod
    def length(self) -> int:
        """Number of filled slots."""

    @abstractmethod
    def rollback(self, length: int) -> None:
        """Forget every slot from ``length`` on."""

    @abstractmethod
    def compact(self, start: int, keep: torch.Tensor | Sequence[int]) -> None:
        """Keep slots ``start + keep[i]`` (ascending) at ``start + i``; length becomes ``start + len(keep)``."""

    def reset(self) -> None:
        self.rollback(0)


class CausalLM(ABC):
    """A causal language model behind the paradecode interface."""

    info: ModelInfo
    tokenizer: object  # a transformers tokenizer (may be None for tiny test models)
    # True when every node of a token tree gets, bit for bit, the logits its path gets fed as a chain
    # (the native engine with its compiled attention); the verifier may then use every node's logits
    exact_tree_logits: bool = False

    @abstractmethod
    def new_cache(self, batch_size: int = 1, capacity: int | None = None) -> KVCache:
        """A fresh cache for ``batch_size`` rows and up to ``capacity`` slots."""

    @abstractmethod
    def forward(
        self,
        cache: KVCache,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        input_valid: torch.Tensor | None = None,
        logits_for: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed new tokens (B, T) and return float32 logits (B, T', V)."""

    def forward_greedy(self, cache: KVCache, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None, *, input_valid: torch.Tensor | None = None,
                       logits_for: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` for a caller that reads nothing but each row's argmax (greedy decoding): a backend
        may return -inf for tokens that cannot be the argmax, computing exact logits only for the others
        (the native engine: ``models/argmax_head.py``). Each row's argmax, ties included, is forward()'s."""
        return self.forward(cache, input_ids, positions, attn_mask, input_valid=input_valid, logits_for=logits_for)

    # -- conveniences shared by all backends -------------------------------
    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def max_context(self) -> int:
        return self.info.max_context

    def default_positions(self, cache: KVCache, T: int, batch: int) -> torch.Tensor:
        """Positions cache.length ... cache.length+T-1 for every row: (B, T)."""
        return torch.arange(cache.length, cache.length + T).unsqueeze(0).expand(batch, T)


def causal_mask(T: int) -> torch.Tensor:
    """(T, T) bool lower-triangular mask: token i sees tokens 0..i."""
    return torch.ones(T, T, dtype=torch.bool).tril_()
