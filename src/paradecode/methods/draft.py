"""Speculative decoding with a smaller draft model that shares the target's tokenizer.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative
Decoding") and Chen et al. 2023 ("Accelerating Large Language Model Decoding
with Speculative Sampling"): a small model drafts k tokens autoregressively
(with probabilities q), the target verifies them in one call. The draft keeps
its own KV cache, rolled back after each verification
(:mod:`paradecode.drafters.chain`); k adapts with acceptance and drafting stops
early when the draft is unsure. Lossless: greedy output equals plain greedy,
sampled output follows the target distribution exactly.

The draft model is given as ``draft_model``: a path ``load_model`` accepts
(CLI: ``-o draft_model=/path/to/small-model``), or an already loaded
:class:`~paradecode.models.base.CausalLM` in the Python API
(``options={"draft_model": small}``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from ..decoding.sink import TokenSink
from ..decoding.speculative import speculative_decode
from ..drafters.chain import ChainDrafter, ChainDraftOptions
from ..errors import UserError
from ..models.base import CausalLM, KVCache
from ..sampling import GenerationConfig
from .base import Method, check, option, register


@dataclass(frozen=True)
class DraftConfig(ChainDraftOptions):
    draft_model: CausalLM | str | None = option(None, "the draft model: a local model directory or .gguf file "
                                                      "with the target's tokenizer (Python API: a loaded model)")
    draft_backend: Literal["native", "transformers"] = option("native", "backend used to load draft_model "
                                                                         "from a path")

    def validate(self) -> None:
        super().validate()
        check(self.draft_model is None or isinstance(self.draft_model, (str, CausalLM)), "draft_model",
              f"must be a path or a loaded model, got {type(self.draft_model).__name__}",
              "pass a model directory, a .gguf file, or a model from paradecode.load_model")


@functools.lru_cache(maxsize=2)
def _load(path: str, backend: str, dtype: str) -> CausalLM:
    from ..models.loading import load_model

    return load_model(path, backend=backend, dtype=dtype)


def resolve_draft_model(config: DraftConfig, target: CausalLM) -> CausalLM:
    """The draft model as a loaded CausalLM (loading a path once per process)."""
    d = config.draft_model
    if d is None or d == "":
        raise UserError("method draft needs a draft model",
                        "give the option draft_model: a smaller model with the same tokenizer", field="draft_model")
    if isinstance(d, CausalLM):
        return d
    return _load(str(d), config.draft_backend, target.info.dtype)


def check_same_vocabulary(target: CausalLM, draft: CausalLM) -> None:
    """Refuse a draft whose token ids do not mean what the target's mean."""
    tv, dv = target.info.vocab_size, draft.info.vocab_size
    if tv != dv:
        raise UserError(f"the draft model's vocabulary has {dv} tokens but the target's has {tv}",
                        "pass a draft model that uses the same tokenizer as the target", field="draft_model")
    tt, dt = target.tokenizer, draft.tokenizer
    if tt is None or dt is None or tt is dt:
        return
    if _token_strings(tt) != _token_strings(dt):
        raise UserError("the draft model's tokenizer differs from the target's (same size, different tokens)",
                        "pass a draft model that uses the same tokenizer as the target", field="draft_model")


@functools.lru_cache(maxsize=4)
def _token_strings(tokenizer) -> tuple[str, ...] | None:
    """Every token's string, id by id (None when the tokenizer cannot list them)."""
    try:
        return tuple(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    except (AttributeError, TypeError):
        return None


class ModelDrafter(ChainDrafter):
    """Drafts with a separate (smaller) causal LM on its own cache."""

    def __init__(self, config: DraftConfig, draft: CausalLM):
        super().__init__(config.chain_options())
        self.draft = draft

    def setup(self, model: CausalLM, prompt_ids: list[int], gen: GenerationConfig, capacity: int) -> KVCache:
        self.stats.extra["draft_model"] = self.draft.info.name
        return self.draft.new_cache(1, min(capacity, self.draft.max_context))

    def draft_forward(self, cache: KVCache, ids: torch.Tensor, logits_for: torch.Tensor) -> torch.Tensor:
        return self.draft.forward(cache, ids, logits_for=logits_for)          # (1, T', V)

    def memory_bytes(self) -> int:
        weights = getattr(self.draft, "weight_bytes", None)
        return super().memory_bytes() + (weights() if callable(weights) else 0)


@register
class DraftModel(Method):
    name = "draft"
    family = "draft-and-verify"
    Config = DraftConfig
    lossless = True
    summary = "speculative decoding with a smaller draft model sharing the tokenizer (Leviathan et al. 2023)"

    def decode(self, model: CausalLM, prompt_ids: list[int], gen: GenerationConfig, sink: TokenSink) -> None:
        draft = resolve_draft_model(self.config, model)
        check_same_vocabulary(model, draft)
        speculative_decode(model, ModelDrafter(self.config, draft), prompt_ids, gen, sink,
                           backoff=self.config.backoff, sizing=self.config.size_drafts)
