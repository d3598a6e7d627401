"""Self-speculative decoding: the target drafts for itself with some layers skipped.

Draft & Verify (Zhang et al. 2023, "Draft & Verify: Lossless Large Language
Model Acceleration via Self-Speculative Decoding"), LayerSkip-style without
training: no second model, no extra weights. The draft runs the native
backend's ``forward(..., layers=kept)`` on its own KV cache; which layers it
skips is chosen per request by a short calibration on the prompt
(:mod:`paradecode.drafters.layer_skip`). Drafts carry q, so sampling is exact;
greedy output is token-identical to plain decoding whatever the skip set.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..decoding.sink import TokenSink
from ..decoding.speculative import speculative_decode
from ..drafters.chain import ChainDrafter, ChainDraftOptions
from ..drafters.layer_skip import SkipSearch, calibrate, encode_prompt_full, skip_count
from ..errors import UserError
from ..models.base import CausalLM, KVCache
from ..sampling import GenerationConfig
from .base import Method, check, option, register


@dataclass(frozen=True)
class SelfSpecConfig(ChainDraftOptions):
    confidence_threshold: float = option(0.6, "stop drafting once the draft's probability of its token "
                                              "falls below this (0 disables)")
    skip_ratio: float = option(0.2, "share of the model's layers the draft skips")
    calibration_steps: int = option(8, "forward passes over the prompt spent choosing which layers to skip "
                                        "(0: evenly spaced, no calibration)")
    skip_layers: tuple[int, ...] = option((), "skip exactly these layers (comma-separated; overrides the "
                                              "calibration)")

    def validate(self) -> None:
        super().validate()
        check(0.0 <= self.skip_ratio < 1.0, "skip_ratio", f"must be in [0, 1), got {self.skip_ratio}",
              "use e.g. 0.2 (skip 20% of the layers)")
        check(0 <= self.calibration_steps <= 200, "calibration_steps",
              f"must be in [0, 200], got {self.calibration_steps}", "use e.g. 10, or 0 to skip calibration")
        check(all(i >= 0 for i in self.skip_layers), "skip_layers", "layer indices must be ≥ 0",
              "pass layer numbers counted from 0, e.g. skip_layers=5,9,13")


def supports_layer_skipping(model: CausalLM) -> bool:
    """Whether the backend can run a subset of its layers (``forward(..., layers=...)``)."""
    return "layers" in inspect.signature(model.forward).parameters


class LayerSkipDrafter(ChainDrafter):
    """Drafts with the target's own weights, running only the kept layers."""

    def __init__(self, config: SelfSpecConfig):
        super().__init__(config.chain_options())
        self.config = config
        self.model: CausalLM | None = None
        self.kept: list[int] = []

    def setup(self, model: CausalLM, prompt_ids: list[int], gen: GenerationConfig, capacity: int) -> KVCache:
        L = model.info.num_layers
        c = self.config
        cache = model.new_cache(1, capacity)
        if c.skip_layers:
            skip = tuple(sorted(set(c.skip_layers)))
            check(skip[-1] < L and len(skip) < L, "skip_layers",
                  f"the model has layers 0..{L - 1} and needs to keep at least one",
                  f"pass indices below {L}")
            encode_prompt_full(model, cache, prompt_ids, 0)
            search = SkipSearch(skip, (float("nan"), float("nan")))
        else:
            search = calibrate(model, cache, prompt_ids, skip_count(L, c.skip_ratio), c.calibration_steps)
        self.model = model
        self.kept = [i for i in range(L) if i not in search.skip]
        self.cached = list(prompt_ids)               # the cache now holds the prompt, encoded with every layer
        self.stats.extra.update(
            skip_layers=list(search.skip),
            calibration_passes=len(search.evaluated),
            calibration_agreement=round(search.score[0], 4) if search.evaluated else None,
        )
        return cache

    def draft_forward(self, cache: KVCache, ids: torch.Tensor, logits_for: torch.Tensor) -> torch.Tensor:
        return self.model.forward(cache, ids, logits_for=logits_for, layers=self.kept)   # (1, T', V)


@register
class SelfSpec(Method):
    name = "selfspec"
    family = "draft-and-verify"
    Config = SelfSpecConfig
    lossless = True
    summary = "self-speculative decoding: the target with layers skipped drafts for itself (Draft & Verify)"

    def decode(self, model: CausalLM, prompt_ids: list[int], gen: GenerationConfig, sink: TokenSink) -> None:
        if not supports_layer_skipping(model):
            raise UserError(f"selfspec needs a backend that can skip layers; the {model.info.backend} backend cannot",
                            "load the model with --backend native (Llama, Mistral or Qwen2 checkpoints)")
        speculative_decode(model, LayerSkipDrafter(self.config), prompt_ids, gen, sink,
                           backoff=self.config.backoff)
