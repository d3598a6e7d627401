"""Self-speculative decoding: the target drafts for itself with some layers skipped.

Draft & Verify (Zhang et al. 2023, "Draft & Verify: Lossless Large Language
Model Acceleration via Self-Speculative Decoding"), LayerSkip-style without
training: no second model, no extra weights. The draft runs the native
backend's ``forward(..., layers=kept)`` on the target's own KV cache (the
committed tokens' keys/values are the full model's; the draft's own are
rolled back before verification). Which layers it skips is chosen by a short
calibration on the first prompt a model serves and then kept for that model
(:mod:`paradecode.drafters.layer_skip`); ``recalibrate`` redoes it per prompt. Drafts carry q, so sampling is exact;
greedy output is token-identical to plain decoding whatever the skip set.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, fields

import torch

from ..decoding.sink import TokenSink
from ..decoding.speculative import PROBE_NODES, BackOff, speculative_decode
from ..drafters.chain import ChainDraftOptions, SharedCacheDrafter
from ..drafters.layer_skip import SkipSearch, calibrate, skip_count
from ..errors import UserError
from ..models.base import CausalLM, KVCache
from ..sampling import GenerationConfig
from .base import Method, check, check_range, option, register


@dataclass(frozen=True)
class SelfSpecConfig(ChainDraftOptions):
    confidence_threshold: float = option(0.6, "stop drafting once the draft's probability of its token "
                                              "falls below this (0 disables)")
    skip_ratio: float = option(0.2, "share of the model's layers the draft skips")
    calibration_steps: int = option(8, "forward passes over the prompt spent choosing which layers to skip "
                                        "(0: evenly spaced, no calibration)")
    skip_layers: tuple[int, ...] = option((), "skip exactly these layers (comma-separated; overrides the "
                                              "calibration)")
    recalibrate: bool = option(False, "calibrate on this prompt even if the model was calibrated before "
                                      "(by default the first prompt's skip set is kept for the model)")

    def validate(self) -> None:
        super().validate()
        check(0.0 <= self.skip_ratio < 1.0, "skip_ratio", f"must be in [0, 1), got {self.skip_ratio}",
              "use e.g. 0.2 (skip 20% of the layers)")
        check_range(self.calibration_steps, 0, 200, "calibration_steps", 10)
        check(all(i >= 0 for i in self.skip_layers), "skip_layers", "layer indices must be ≥ 0",
              "pass layer numbers counted from 0, e.g. skip_layers=5,9,13")
        check(len(set(self.skip_layers)) == len(self.skip_layers), "skip_layers",
              f"lists a layer twice ({','.join(map(str, self.skip_layers))})", "name each layer once")
        if self.skip_layers:            # the calibration's settings would be dropped without a word
            for name in ("skip_ratio", "calibration_steps", "recalibrate"):
                default = next(f.default for f in fields(self) if f.name == name)
                check(getattr(self, name) == default, name, "has no effect with skip_layers (no calibration runs)",
                      f"drop {name}, or drop skip_layers to calibrate")


def supports_layer_skipping(model: CausalLM) -> bool:
    """Whether the backend can run a subset of its layers (``forward(..., layers=...)``)."""
    return "layers" in inspect.signature(model.forward).parameters


# model -> {(layers to skip, calibration steps): the search run on the first prompt}
_CALIBRATED: "weakref.WeakKeyDictionary[CausalLM, dict[tuple[int, int], SkipSearch]]" = weakref.WeakKeyDictionary()


# model -> {config: what the back-off learned there (BackOff.snapshot)}
_LEARNED: "weakref.WeakKeyDictionary[CausalLM, dict[SelfSpecConfig, tuple]]" = weakref.WeakKeyDictionary()


class LayerSkipDrafter(SharedCacheDrafter):
    """Drafts with the target's own weights and cache, running only the kept layers."""

    def __init__(self, config: SelfSpecConfig):
        super().__init__(config.chain_options())
        self.config = config
        self.model: CausalLM | None = None
        self.kept: list[int] = []

    def setup(self, model: CausalLM, prompt_ids: list[int], gen: GenerationConfig, capacity: int) -> KVCache:
        cache = super().setup(model, prompt_ids, gen, capacity)
        L = model.info.num_layers
        c = self.config
        reused = False
        if c.skip_layers:
            skip = tuple(sorted(set(c.skip_layers)))
            check(skip[-1] < L and len(skip) < L, "skip_layers",
                  f"the model has layers 0..{L - 1} and needs to keep at least one",
                  f"pass indices below {L}")
            search = SkipSearch(skip, (float("nan"), float("nan")))
        else:
            key = (skip_count(L, c.skip_ratio), c.calibration_steps)
            known = _CALIBRATED.setdefault(model, {})
            reused = key in known and not c.recalibrate
            if not reused:
                known[key] = calibrate(model, cache, prompt_ids, *key)
            search = known[key]
        self.model = model
        self.kept = [i for i in range(L) if i not in search.skip]
        self.stats.extra.update(
            skip_layers=list(search.skip),
            calibration_passes=0 if reused else len(search.evaluated),
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
        drafter = LayerSkipDrafter(self.config)
        # what the back-off learned on this model is kept like the calibration: a skip set whose drafts
        # do not pay on this machine then costs one lesson, not one per request
        learned = _LEARNED.setdefault(model, {})
        backoff = BackOff(drafter.max_nodes, enabled=self.config.backoff,
                          probe_nodes=PROBE_NODES, sizing=self.config.size_drafts).restore(learned.get(self.config))
        speculative_decode(model, drafter, prompt_ids, gen, sink, backoff=backoff)
        learned[self.config] = backoff.snapshot()
