"""Diffusion samplers: one semi-autoregressive block loop, variants as small policy objects.

The loop (:func:`generate`) is LLaDA's (Nie et al., 2025): the answer region
of ``gen_length`` ``<mask>`` slots is split into blocks decoded left to right;
within a block, each step runs the model (optionally through the Fast-dLLM
approximate KV cache, :class:`~paradecode.diffusion.model.BlockKVCache`) and a
policy chooses which masked slots to commit to their argmax token. Samplers
differ only in the policy (``select``); every one returns the honest cost:
``nfe`` counts model calls (a batched call counts once), and the committed
tokens per step.

Registry: :data:`DIFFUSION_SAMPLERS` maps a name to a :class:`Sampler` class
with a typed frozen config (built and validated by :func:`build_sampler`).
These are not autoregressive methods and are not in ``paradecode.methods``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping

import torch

from ..errors import UserError
from ..methods.base import check, option
from . import rules
from .model import BlockKVCache, MaskedDiffusionLM

DIFFUSION_SAMPLERS: dict[str, type["Sampler"]] = {}


def register(cls):
    if cls.name in DIFFUSION_SAMPLERS:
        raise RuntimeError(f"diffusion sampler {cls.name!r} registered twice")
    DIFFUSION_SAMPLERS[cls.name] = cls
    return cls


@dataclass
class DiffusionResult:
    x: torch.Tensor                      # (B, P + G) prompt and answer tokens
    prompt_length: int
    nfe: int                             # model calls (a batched verification call counts once)
    seconds: float
    committed_per_step: list[int] = field(default_factory=list)   # tokens committed (summed over the batch)

    @property
    def answer(self) -> torch.Tensor:
        return self.x[:, self.prompt_length:]                        # (B, G)


@dataclass
class StepState:
    """What a policy sees at one step. Tensors cover the answer region (B, G)."""

    tokens: torch.Tensor                 # (B, G) argmax token per slot
    conf: torch.Tensor                   # (B, G) probability of the argmax
    gap: torch.Tensor                    # (B, G) top-1 minus top-2 log-probability
    masked: torch.Tensor                 # (B, G) still <mask> and in the current block
    answer_masked: torch.Tensor          # (B, G) still <mask> anywhere in the answer
    step: int                            # step index within the block
    block: tuple[int, int]               # current block, answer-relative [s, e)
    x: torch.Tensor                      # (B, P + G) the full current sequence
    prompt_length: int
    mask_id: int
    eos_id: int
    verify: Callable[[torch.Tensor], torch.Tensor] | None = None   # batched exact forward, counts 1 NFE


@dataclass
class Selection:
    commit: torch.Tensor                 # (B, G) slots to commit now
    tokens: torch.Tensor | None = None   # (B, G) tokens to write (default: the argmax)
    next_logits: torch.Tensor | None = None   # (B, P + G, V) exact logits of the new state, if known


@dataclass(frozen=True)
class BlockOptions:
    block_length: int = option(0, "semi-autoregressive block length; 0 = one block over the whole answer")
    cache: Literal["none", "prefix", "dual"] = option("none", "Fast-dLLM approximate KV cache")

    def validate(self) -> None:
        check(self.block_length >= 0, "block_length", f"must be >= 0, got {self.block_length}",
              "pass 0 (one block) or a positive block length")


class Sampler:
    """A diffusion sampler: a config and a ``select`` policy for the shared block loop."""

    name: ClassVar[str]
    Config: ClassVar[type] = BlockOptions
    lossless: ClassVar[bool] = False     # True: output identical to one-token-per-step decoding
    summary: ClassVar[str] = ""

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
        self.validate(self.config)

    @classmethod
    def validate(cls, config: Any) -> None:
        config.validate()

    def select(self, st: StepState) -> Selection:
        raise NotImplementedError

    def reset(self, gen_length: int, block_length: int) -> None:
        """Called once per decode before the first step."""

    def decode(self, model: MaskedDiffusionLM, prompt_ids, gen_length: int) -> DiffusionResult:
        return generate(model, prompt_ids, gen_length, self)


def _blocks(gen_length: int, block_length: int) -> list[tuple[int, int]]:
    b = block_length or gen_length
    return [(s, min(s + b, gen_length)) for s in range(0, gen_length, b)]


@torch.inference_mode()
def generate(model: MaskedDiffusionLM, prompt_ids, gen_length: int, sampler: Sampler) -> DiffusionResult:
    """Decode ``gen_length`` answer slots after ``prompt_ids`` ((P,) or (B, P), equal lengths).

    The one block loop shared by every sampler. Exactness: with cache ``none`` every step's logits
    are the model's exact logits for the current state; ``prefix``/``dual`` reuse keys/values from
    the last block boundary (approximate, Fast-dLLM).
    """
    t0 = time.perf_counter()
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
    if prompt.dim() == 1:
        prompt = prompt[None]
    B, P = prompt.shape
    if gen_length < 1:
        raise UserError(f"gen_length must be >= 1, got {gen_length}", "pass a positive answer length")
    if P + gen_length > model.shape.max_context:
        raise UserError(f"prompt of {P} plus {gen_length} answer slots exceeds the model's context of "
                        f"{model.shape.max_context}", "shorten the prompt or the answer length")
    mask_id = model.shape.mask_id
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id)], dim=1)        # (B, P + G)
    cfg = sampler.config
    cache = BlockKVCache(model, cfg.cache)
    blocks = _blocks(gen_length, cfg.block_length)
    sampler.reset(gen_length, blocks[0][1] - blocks[0][0])
    nfe, per_step = 0, []

    def verify(batch: torch.Tensor) -> torch.Tensor:                   # (K, P + G) -> (K, P + G, V)
        nonlocal nfe
        nfe += 1
        return model.forward(batch)[0]

    logits = None                                                                # exact logits of x, if known
    slot = torch.arange(gen_length)
    for s, e in blocks:
        in_block = (slot >= s) & (slot < e)                                      # (G,)
        if not ((x[:, P:] == mask_id) & in_block).any():
            continue                                                             # filled early (Prophet, EoT)
        if logits is None or cfg.cache != "none":
            logits = cache.refresh(x, (P + s, P + e))                            # (B, P + G, V)
            nfe += 1
        step = 0
        while True:
            answer_masked = x[:, P:] == mask_id                                 # (B, G)
            masked = answer_masked & in_block
            tokens, conf, gap = rules.step_confidence(logits[:, P:])             # (B, G) each
            sel = sampler.select(StepState(tokens, conf, gap, masked, answer_masked, step, (s, e), x, P,
                                           mask_id, model.shape.eos_id, verify if cfg.cache == "none" else None))
            commit = sel.commit & answer_masked
            assert bool((commit.any(dim=1) | ~masked.any(dim=1)).all()), f"{sampler.name} committed nothing"
            new = tokens if sel.tokens is None else sel.tokens
            x[:, P:] = torch.where(commit, new, x[:, P:])
            per_step.append(int(commit.sum()))
            step += 1
            logits = sel.next_logits
            if not ((x[:, P:] == mask_id) & in_block).any():
                break
            if logits is None:
                logits = cache.step(x)                                           # (B, P + G, V)
                nfe += 1
    return DiffusionResult(x, P, nfe, time.perf_counter() - t0, per_step)


# -- samplers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LowConfidenceOptions(BlockOptions):
    steps: int = option(0, "total denoising steps over the answer; 0 = one token per step (gen_length)")
    remasking: Literal["low_confidence", "random"] = option("low_confidence",
                                                            "which slots to commit: most confident or random")
    seed: int = option(0, "random remasking seed")

    def validate(self) -> None:
        super().validate()
        check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}", "pass 0 or a positive step count")


@register
class LowConfidence(Sampler):
    """LLaDA fixed-step sampler: each block gets ``steps / n_blocks`` steps, each commits a fixed number
    of slots — the most confident (low-confidence remasking) or random ones (Nie et al., 2025, App. B)."""

    name = "llada"
    Config = LowConfidenceOptions
    summary = "LLaDA fixed steps per block, low-confidence or random remasking"

    def reset(self, gen_length, block_length):
        n_blocks = -(-gen_length // block_length)
        steps = self.config.steps or gen_length
        if steps % n_blocks:
            raise UserError(f"steps={steps} is not divisible by the {n_blocks} blocks",
                            "choose steps as a multiple of gen_length / block_length")
        self.steps_per_block = steps // n_blocks
        self.gen = torch.Generator().manual_seed(self.config.seed)

    def select(self, st):
        size = st.block[1] - st.block[0]
        schedule = rules.llada_schedule(size, min(self.steps_per_block, size))
        k = schedule[st.step] if st.step < len(schedule) else size
        conf = st.conf
        if self.config.remasking == "random":
            conf = torch.rand(conf.shape, generator=self.gen)
        return Selection(rules.top_k(conf, st.masked, k))


@dataclass(frozen=True)
class ThresholdOptions(BlockOptions):
    threshold: float = option(0.9, "commit every masked slot with confidence above this (1.0 = one per step)")

    def validate(self) -> None:
        super().validate()
        check(0.0 <= self.threshold <= 1.0, "threshold", f"must be in [0, 1], got {self.threshold}",
              "pass a probability such as 0.9")


@register
class Threshold(Sampler):
    """Fast-dLLM confidence-threshold parallel decoding (Wu et al., 2025)."""

    name = "threshold"
    Config = ThresholdOptions
    summary = "Fast-dLLM: commit all slots with confidence > threshold"

    def select(self, st):
        return Selection(rules.threshold_rule(st.conf, st.masked, self.config.threshold))


@dataclass(frozen=True)
class FactorOptions(BlockOptions):
    factor: float = option(1.0, "commit the n-th most confident while c_n >= 1 - factor/(n+1)")

    def validate(self) -> None:
        super().validate()
        check(self.factor > 0, "factor", f"must be > 0, got {self.factor}", "pass a factor such as 1.0")


@register
class Factor(Sampler):
    """Fast-dLLM factor rule (Wu et al., 2025): the number committed adapts to the confidences."""

    name = "factor"
    Config = FactorOptions
    summary = "Fast-dLLM factor rule: commit n while (n+1)(1-c_n) <= factor"

    def select(self, st):
        return Selection(rules.factor_rule(st.conf, st.masked, self.config.factor))


@dataclass(frozen=True)
class ProphetOptions(BlockOptions):
    gap_high: float = option(7.5, "mean top-1/top-2 log-prob gap needed in the first third of the answer")
    gap_mid: float = option(5.0, "gap needed in the second third")
    gap_low: float = option(2.5, "gap needed in the last third")

    def validate(self) -> None:
        super().validate()
        check(self.gap_high >= self.gap_mid >= self.gap_low >= 0, "gap_high",
              "thresholds must satisfy gap_high >= gap_mid >= gap_low >= 0", "e.g. 7.5, 5.0, 2.5")


@register
class Prophet(Sampler):
    """Prophet early commit (Li et al., 2025): one token per step until the model is sure enough,
    then fill every remaining masked answer slot with its argmax at once ("go all in").
    With a dual cache the logits outside the block are those of the last refresh."""

    name = "prophet"
    Config = ProphetOptions
    summary = "Prophet: one token per step, then commit everything once the top-2 gap is large"

    def select(self, st):
        G = st.answer_masked.shape[1]
        progress = 1 - st.answer_masked.sum(dim=1) / G                           # (B,)
        c = self.config
        go = rules.prophet_go_all_in(st.gap, st.answer_masked, progress, (c.gap_high, c.gap_mid, c.gap_low))
        one = rules.top_k(st.conf, st.masked, 1)
        return Selection(torch.where(go[:, None], st.answer_masked, one))


@dataclass(frozen=True)
class LocalLeapOptions(BlockOptions):
    anchor_threshold: float = option(0.9, "slots above this are anchors and commit")
    relaxed_threshold: float = option(0.75, "threshold for masked slots near an anchor")
    radius: int = option(2, "how many positions around an anchor are relaxed")

    def validate(self) -> None:
        super().validate()
        check(0 <= self.relaxed_threshold <= self.anchor_threshold <= 1, "relaxed_threshold",
              "need 0 <= relaxed_threshold <= anchor_threshold <= 1", "e.g. anchor 0.9, relaxed 0.75")
        check(self.radius >= 0, "radius", f"must be >= 0, got {self.radius}", "pass a small radius such as 2")


@register
class LocalLeap(Sampler):
    """LocalLeap (Kong et al., 2025): high-confidence anchors relax the threshold nearby."""

    name = "localleap"
    Config = LocalLeapOptions
    summary = "LocalLeap: anchors above 0.9 let neighbours within a radius commit above 0.75"

    def select(self, st):
        c = self.config
        return Selection(rules.local_leap_rule(st.conf, st.masked, c.anchor_threshold, c.relaxed_threshold,
                                               c.radius))


@dataclass(frozen=True)
class FreeDaveOptions(BlockOptions):
    drafts: int = option(8, "draft states verified per batched call (top-1 .. top-K commits)")

    def validate(self) -> None:
        super().validate()
        check(self.drafts >= 1, "drafts", f"must be >= 1, got {self.drafts}", "pass e.g. 8")
        check(self.cache == "none", "cache", "FreeDave verifies against exact logits",
              "use cache=none (the verification is the lossless part)")


@register
class FreeDave(Sampler):
    """FreeDave lossless draft-and-verify (Wu et al., 2025, "Free draft-and-verification").

    From the exact logits of state x_0, draft j commits the top-j most confident masked slots
    (j = 1..K): states x_1..x_K. One batched forward gives exact logits of every draft. x_1 is
    the one-token-per-step successor of x_0; x_{j+1} is too for x_j exactly when the
    one-token-per-step choice under x_j's logits (most confident masked slot and its argmax)
    is the (j+1)-th draft commit. Keep the longest verified chain x_m (m >= 1); its logits,
    already computed, draft the next round. Output identical to ``llada`` with one token per
    step and no cache (up to floating-point differences between batch sizes).
    """

    name = "freedave"
    Config = FreeDaveOptions
    lossless = True
    summary = "FreeDave: lossless batched draft-and-verify of one-token-per-step decoding"

    def select(self, st):
        B, G = st.masked.shape
        if B != 1:
            raise UserError("freedave decodes one sequence at a time", "pass one prompt")
        P = st.prompt_length
        n_masked = int(st.masked.sum())
        K = min(self.config.drafts, n_masked)
        order = rules.rank_masked(st.conf, st.masked)[0, :K]                     # (K,) slots by confidence
        drafts = st.x.repeat(K, 1)                                               # (K, P + G)
        for j in range(K):
            drafts[j:, P + order[j]] = st.tokens[0, order[j]]                    # draft j commits order[:j+1]
        logits = st.verify(drafts)                                               # (K, P + G, V), 1 NFE
        tokens, conf, _ = rules.step_confidence(logits[:, P:])                   # (K, G)
        still = (drafts[:, P:] == st.mask_id) & st.masked                        # (K, G) in-block masks
        m = 1
        while m < K:
            nxt = rules.rank_masked(conf[m - 1:m], still[m - 1:m])[0, 0]         # reference choice after x_m
            if int(nxt) != int(order[m]) or int(tokens[m - 1, nxt]) != int(st.tokens[0, order[m]]):
                break
            m += 1
        commit = torch.zeros_like(st.masked)
        commit[0, order[:m]] = True
        return Selection(commit, next_logits=logits[m - 1:m])


# -- config building --------------------------------------------------------------------------
def build_sampler(name: str, options: Mapping[str, Any] | None = None) -> Sampler:
    """A sampler from its registry name and string/JSON options, validated once."""
    from ..methods.base import build_config

    if name not in DIFFUSION_SAMPLERS:
        raise UserError(f"unknown diffusion sampler {name!r}", f"choose one of: {', '.join(DIFFUSION_SAMPLERS)}",
                        field="sampler")
    cls = DIFFUSION_SAMPLERS[name]
    fields = [f.name for f in dataclasses.fields(cls.Config)]
    unknown = [k for k in (options or {}) if k not in fields]
    if unknown:                       # checked here so the message says "sampler", not "method"
        raise UserError(f"sampler {name} has no option {unknown[0]!r}", f"its options are: {', '.join(fields)}",
                        field=unknown[0])
    return cls(build_config(cls, options))


def sampler_options(cls: type[Sampler]) -> list[dict[str, Any]]:
    return [{"name": f.name, "default": f.default, "help": f.metadata.get("help", "")}
            for f in dataclasses.fields(cls.Config)]
