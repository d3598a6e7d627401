"""Quantized self-speculation: an int4 copy of the target drafts, the target verifies.

QSpec (Zhao et al. 2024, "QSpec: Speculative Decoding with Complementary
Quantization Schemes") drafts with a low-precision version of the model and
verifies with a higher-precision one, on one shared KV cache. On a CPU this
fits the cost curve of the kernels (``docs/engine.md``): int4 is the fastest
format for single-token steps and grows the steepest with the rows of a call
(16 rows ~4.6x one on the Zen 4 of session 18), while bfloat16 costs ~1.3x one
row for 8 rows and ~2.2x for 16 there (less with AMX tiles). So the draft runs
token by token in int4 and the verification runs the whole chain in one call of
the target's own format.

The draft is built from the target's own checkpoint (:meth:`NativeLlama.twin`,
no second model, no training). It drafts *on the target's cache*: the
committed tokens' keys/values are the target's, the draft writes its own for
the tokens it proposes and rolls the cache back before the verification call
overwrites them. The draft therefore has no prompt to prefill and no state to
catch up. Drafts carry q when sampling, so the output follows the target's
distribution exactly; greedy output is token-identical to plain decoding.

Copying is cheaper still: before drafting with the twin, the drafter tries
prompt lookup (:mod:`.pld`) with the context's last 3..``lookup_ngram``
tokens; a match is drafted for free (a deterministic draft, exact under
sampling too), so input-grounded answers get prompt lookup's long copies and
open-ended ones the twin's drafts. A copy accepted whole doubles the next
lookup's length (up to ``max_lookup_tokens``); one that breaks off resets it:
long verbatim spans then cost a few calls, not one per ``lookup_tokens``.
And where the twin drafts, it stops as soon as its tokens end on an n-gram
of the context, and what followed that n-gram there continues the draft
for free (``lookup_after_draft``).

The twin's LM head scores only part of the vocabulary (``draft_vocab``,
:mod:`..drafters.vocab`): the first ids, which a BPE vocabulary lists by
frequency, plus the request's own tokens.

``draft_activations=16`` drafts with a more exact int4 twin (the int4
kernel's A16 variant, its best logits rechecked with the head's own values):
it agrees with the target 99% of the time against 97%, but its steps cost
~9% more, which only answers in another language repay
(``docs/speculative-draft-and-self.md``, "A more exact twin").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..decoding.sink import TokenSink
from ..decoding.speculative import speculative_decode
from ..decoding.tree import Draft
from ..decoding.verify import Verdict
from ..drafters.chain import ChainDraftOptions, SharedCacheDrafter
from ..drafters.vocab import DraftVocab
from ..errors import UserError
from ..models.base import CausalLM, KVCache
from ..sampling import GenerationConfig
from .base import Method, check, check_range, option, register
from .pld import prompt_lookup


@dataclass(frozen=True)
class QuantSpecConfig(ChainDraftOptions):
    num_draft_tokens: int = option(6, "draft tokens per step at the start (k)")
    max_draft_tokens: int = option(12, "upper bound for k under the heuristic schedule")
    confidence_threshold: float = option(0.1, "stop drafting once the draft's probability of its token "
                                              "falls below this (0 disables)")
    draft_format: Literal["int4", "int8"] = option("int4", "weight format of the draft copy")
    draft_activations: Literal[8, 16] = option(8, "an int4 twin's products: 16 (float16 scales, activations in "
                                                   "two int8 levels, each row's best logits rechecked with the "
                                                   "target's head values) or 8 (GGUF's Q8 blocks, the int4 "
                                                   "format's own)")
    lookup_ngram: int = option(2, "first try prompt lookup with the context's last n-gram, n from 3 down to "
                                  "this (0: never); a match drafts for free, the twin drafts otherwise")
    lookup_tokens: int = option(10, "tokens a prompt-lookup match drafts")
    max_lookup_tokens: int = option(32, "a lookup draft accepted whole doubles the next one's length, up to "
                                        "this (= lookup_tokens: fixed length)")
    lookup_after_draft: bool = option(True, "once the twin's draft ends on an n-gram of the context, stop the "
                                            "twin and continue with what followed it there (free tokens)")
    draft_vocab: int = option(24576, "the twin's LM head scores only the vocabulary's first N ids plus the "
                                     "request's prompt and output tokens, until its first miss (FR-Spec; "
                                     "0: the whole vocabulary)")

    def validate(self) -> None:
        super().validate()
        check(0 <= self.lookup_ngram <= 3, "lookup_ngram", f"must be in 0..3, got {self.lookup_ngram}",
              "use 2 (default), 1 for more matches, or 0 to draft only with the twin")
        check_range(self.lookup_tokens, 1, 64, "lookup_tokens", 10)
        check(self.lookup_tokens <= self.max_lookup_tokens <= 64, "max_lookup_tokens",
              f"must be in lookup_tokens..64 ({self.lookup_tokens}..64), got {self.max_lookup_tokens}",
              f"e.g. max_lookup_tokens={max(32, self.lookup_tokens)}")
        check(self.draft_vocab == 0 or 16 <= self.draft_vocab <= 1 << 20, "draft_vocab",
              f"must be 0 (the whole vocabulary) or in 16..{1 << 20}, got {self.draft_vocab}",
              "e.g. draft_vocab=24576")
        check(self.draft_format == "int4" or self.draft_activations == 8, "draft_activations",
              f"applies to an int4 twin only (draft_format={self.draft_format})",
              "drop draft_activations, or use draft_format=int4")


class TwinDrafter(SharedCacheDrafter):
    """Drafts with a low-bit twin of the target on the target's own KV cache, after a free prompt lookup."""

    def __init__(self, config: QuantSpecConfig, twin: CausalLM):
        super().__init__(config.chain_options())
        self.config = config
        self.twin = twin
        self.max_nodes = max(self.max_nodes, config.max_lookup_tokens if config.lookup_ngram else 0)
        self.looked_up = False                   # whether the last draft came from prompt lookup
        self.lookup_len = config.lookup_tokens   # grows while copies are accepted whole
        self.vocab: DraftVocab | None = None     # what the twin's head scores (None: every token)

    def setup(self, model: CausalLM, prompt_ids: list[int], gen: GenerationConfig, capacity: int) -> KVCache:
        self.stats.extra.update(draft_format=self.twin.info.dtype, lookup_drafts=0, lookup_extensions=0)
        self.vocab = DraftVocab.build(self.twin, self.config.draft_vocab)
        if self.vocab is not None:
            self.vocab.add(list(prompt_ids) + list(model.info.eos_token_ids))
            self.stats.extra["draft_vocab"] = len(self.vocab)
        return super().setup(model, prompt_ids, gen, capacity)

    def propose(self, context: list[int], max_nodes: int) -> Draft:
        c = self.config
        found = prompt_lookup(context, 3, c.lookup_ngram, min(max_nodes, self.lookup_len)) if c.lookup_ngram else []
        self.looked_up = bool(found)
        if found:
            self.stats.extra["lookup_drafts"] += 1
            return Draft.chain(found)            # deterministic: one-hot q, exact under sampling too
        return super().propose(context, min(max_nodes, self.opt.max_draft_tokens + self.lookup_len))

    def free_tail(self, context: list[int], drafted: list[int], room: int) -> list[int]:
        """Once the twin's tokens end on an n-gram of the context, what followed it there (the twin stops)."""
        c = self.config
        if not (c.lookup_after_draft and c.lookup_ngram) or room <= 0:
            return []
        more = prompt_lookup(context + drafted, 3, c.lookup_ngram, min(room, self.lookup_len))
        self.stats.extra["lookup_extensions"] += bool(more)
        return more

    def observe(self, context: list[int], verdict: Verdict, logits: torch.Tensor) -> None:
        if self.vocab is not None:
            self._learn_vocab(verdict)
        if not self.looked_up:                   # the twin's draft length learns from its own tokens only
            super().observe(context, verdict, logits)
            return
        drafted = len(verdict.draft)
        if verdict.num_accepted < drafted:       # a copy that broke off: back to the base length
            self.lookup_len = self.config.lookup_tokens
        elif drafted >= self.lookup_len:         # copied whole (not cut short by the match): copy more next time
            self.lookup_len = min(2 * self.lookup_len, self.config.max_lookup_tokens)

    def _learn_vocab(self, verdict: Verdict) -> None:
        """Keep what the target wrote proposable, or give up the vocabulary at the twin's first miss: a
        rejected twin token where the target's own token lay outside it (an answer in another language or
        full of rare words; one miss costs more than many steps of the cheaper head save)."""
        v, extra = self.vocab, self.stats.extra
        if not self.looked_up:
            j = verdict.num_accepted
            if j < self.own_drafted(verdict) and verdict.tokens[j] not in v:
                extra["draft_vocab_missed"] = True
                self.vocab = None                # the whole head from here on
                extra["draft_vocab"] = self.twin.vocab_size
                return
        v.add(verdict.tokens)
        extra["draft_vocab"] = len(v)

    def draft_forward(self, cache: KVCache, ids: torch.Tensor, logits_for: torch.Tensor) -> torch.Tensor:
        return self.twin.forward(cache, ids, logits_for=logits_for, vocab=self.vocab)    # (1, T', V)

    def memory_bytes(self) -> int:
        return self.twin.weight_bytes(held=True)


@register
class QuantSpec(Method):
    name = "quantspec"
    family = "draft-and-verify"
    Config = QuantSpecConfig
    lossless = True
    summary = "quantized self-speculation: an int4 copy of the target drafts, the target verifies (QSpec)"

    def decode(self, model: CausalLM, prompt_ids: list[int], gen: GenerationConfig, sink: TokenSink) -> None:
        twin_of = getattr(model, "twin", None)
        if twin_of is None:
            raise UserError(f"quantspec needs a backend that can re-quantize the model; the {model.info.backend} "
                            "backend cannot", "load the model with --backend native (Llama, Mistral or Qwen2)")
        fmt = self.config.draft_format
        if model.info.dtype == fmt:
            raise UserError(f"quantspec drafts with an {fmt} copy, but the model already runs in {fmt}",
                            "load the model in a wider format (--dtype bfloat16 or float32) or pick another method")
        twin = twin_of(fmt, int4_activations=self.config.draft_activations)     # (an int8 twin ignores it)
        speculative_decode(model, TwinDrafter(self.config, twin), prompt_ids, gen, sink,
                           backoff=self.config.backoff, sizing=self.config.size_drafts)
