"""Masked diffusion language models: model, caches, samplers, tasks, training, benchmark.

Quick start::

    from paradecode.diffusion import load_shipped, build_sampler, VOCAB
    model = load_shipped()
    sampler = build_sampler("threshold", {"threshold": 0.9})
    r = sampler.decode(model, VOCAB.encode("<bos> sort : d a c b"), gen_length=10)
    print(VOCAB.decode(r.answer[0]), r.nfe)

See docs/diffusion.md.
"""

from .model import BlockKVCache, DiffusionShape, DiffusionTransformer, MaskedDiffusionLM, load_shipped
from .samplers import DIFFUSION_SAMPLERS, DiffusionResult, Sampler, build_sampler, generate
from .vocab import VOCAB, Vocab
from . import learn2pd as _learn2pd  # noqa: F401  (registers the learn2pd sampler)

__all__ = ["BlockKVCache", "DiffusionShape", "DiffusionTransformer", "MaskedDiffusionLM", "load_shipped",
           "DIFFUSION_SAMPLERS", "DiffusionResult", "Sampler", "build_sampler", "generate", "VOCAB", "Vocab"]
