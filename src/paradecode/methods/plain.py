"""Plain autoregressive decoding: one token per model call.

The oracle every lossless method is tested against and the baseline every
speedup is measured against. Supports a batch of prompts (left padding).
"""

from __future__ import annotations

import time

import torch

from ..decoding.sink import TokenSink
from ..models.base import CausalLM
from ..sampling import GenerationConfig, next_token
from .base import Method, register


def prefill(model: CausalLM, prompt_ids: list[int], capacity: int, sink: TokenSink, greedy: bool = False):
    """Encode a prompt (batch 1) and return (cache, logits of the last prompt token (V,)); ``greedy``: only
    their argmax is read (:meth:`CausalLM.forward_greedy`)."""
    cache = model.new_cache(1, capacity)
    ids = torch.tensor([prompt_ids])
    forward = model.forward_greedy if greedy else model.forward
    with sink.stats.timing("prefill"):
        logits = forward(cache, ids, logits_for=torch.tensor([len(prompt_ids) - 1]))
    sink.stats.model_calls += 1
    return cache, logits[0, -1]


@register
class Plain(Method):
    name = "plain"
    family = "baseline"
    summary = "one token per model call: the baseline and the oracle for every lossless method"

    def decode(self, model, prompt_ids, gen, sink):
        self.decode_batch(model, [prompt_ids], gen, [sink])

    def decode_batch(self, model: CausalLM, prompts: list[list[int]], gen: GenerationConfig,
                     sinks: list[TokenSink]) -> None:
        B = len(prompts)
        t_start = time.perf_counter()
        lens = torch.tensor([len(p) for p in prompts])
        Lmax = int(lens.max())
        pad = model.info.pad_token_id
        ids = torch.full((B, Lmax), pad, dtype=torch.long)
        valid = torch.zeros(B, Lmax, dtype=torch.bool)
        for b, p in enumerate(prompts):                      # left padding
            ids[b, Lmax - len(p):] = torch.tensor(p)
            valid[b, Lmax - len(p):] = True
        positions = (valid.long().cumsum(-1) - 1).clamp_(min=0)  # (B, Lmax): pads at 0
        cache = model.new_cache(B, Lmax + gen.max_new_tokens)
        generator = gen.generator()

        forward = model.forward_greedy if gen.greedy else model.forward    # greedy reads only the argmax
        t0 = time.perf_counter()
        logits = forward(cache, ids, positions, input_valid=None if bool(valid.all()) else valid,
                         logits_for=torch.tensor([Lmax - 1]))         # (B, 1, V)
        dt = time.perf_counter() - t0
        tok = next_token(logits[:, -1], gen, generator)               # (B,)
        next_pos = lens.clone()                                       # (B,)
        alive = torch.ones(B, dtype=torch.bool)
        for b, s in enumerate(sinks):
            s.stats.prefill_time += dt
            s.stats.model_calls += 1
            s.stats.prompt_tokens = int(lens[b])
            s.stats.record_call(1)
            if s.emit([int(tok[b])]):
                alive[b] = False

        while bool(alive.any()):
            if cache.length + 1 > cache.capacity:
                break
            x = torch.where(alive, tok, torch.full_like(tok, pad))[:, None]  # (B, 1)
            t0 = time.perf_counter()
            logits = forward(cache, x, next_pos[:, None], input_valid=None if bool(alive.all()) else alive[:, None])
            tok = next_token(logits[:, -1], gen, generator)
            dt = time.perf_counter() - t0
            next_pos += 1
            for b, s in enumerate(sinks):
                if not alive[b]:
                    continue
                s.stats.verify_time += dt
                s.stats.model_calls += 1
                s.stats.record_call(1)
                if s.emit([int(tok[b])]):
                    alive[b] = False
        wall = time.perf_counter() - t_start
        for s in sinks:
            s.stats.wall_time = wall
