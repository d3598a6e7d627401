"""transformers adapter: any ``AutoModelForCausalLM`` behind the paradecode interface.

Wraps the model by composition: a ``DynamicCache`` per request, custom 4-D
masks for token trees and Jacobi windows, rollback by slicing the cached
tensors. Nothing in transformers is patched. Slower than the native backend;
use it for architectures the native backend lacks.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from .base import CausalLM, KVCache, ModelInfo, causal_mask


class HFCache(KVCache):
    def __init__(self, model, batch_size: int, capacity: int):
        from transformers import DynamicCache

        self.batch_size = batch_size
        self.capacity = capacity
        self.cache = DynamicCache(config=model.config)
        self.valid = torch.ones(batch_size, 0, dtype=torch.bool)

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def _layers(self):
        return [layer for layer in self.cache.layers if getattr(layer, "is_initialized", True)
                and getattr(layer, "keys", None) is not None and layer.keys.numel()]

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: cache holds {self.length}")
        for layer in self._layers():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
        self.valid = self.valid[:, :length]

    def compact(self, start: int, keep: torch.Tensor | Sequence[int]) -> None:
        keep = torch.as_tensor(keep, dtype=torch.long)
        idx = torch.cat([torch.arange(start), keep + start])
        if idx.numel() and int(idx.max()) >= self.length:
            raise ValueError("compact indices beyond the filled cache")
        for layer in self._layers():
            layer.keys = layer.keys.index_select(-2, idx)
            layer.values = layer.values.index_select(-2, idx)
        self.valid = self.valid.index_select(1, idx)


class HFCausalLM(CausalLM):
    """Adapter around a loaded transformers causal LM."""

    def __init__(self, model, tokenizer=None, *, name: str = "model", dtype: str = "float32"):
        self.model = model.eval()
        # transformers 5.25 renamed forward's past_key_values to cache (the old name goes in 5.40)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.tokenizer = tokenizer
        c = model.config
        eos = getattr(c, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos_ids = tuple(dict.fromkeys(eos_ids + (tokenizer.eos_token_id,)))
        pad = getattr(c, "pad_token_id", None)
        self.info = ModelInfo(
            name=name, architecture=(getattr(c, "architectures", None) or [type(model).__name__])[0],
            vocab_size=model.get_output_embeddings().weight.shape[0], num_layers=c.num_hidden_layers,
            max_context=int(getattr(c, "max_position_embeddings", 2048)), eos_token_ids=eos_ids,
            pad_token_id=int(pad if pad is not None else (eos_ids[0] if eos_ids else 0)),
            dtype=dtype, backend="transformers",
        )
        self._dtype = next(model.parameters()).dtype

    def new_cache(self, batch_size: int = 1, capacity: int | None = None) -> HFCache:
        return HFCache(self.model, batch_size, min(capacity or self.max_context, self.max_context))

    @torch.inference_mode()
    def forward(self, cache, input_ids, positions=None, attn_mask=None, *, input_valid=None, logits_for=None):
        B, T = input_ids.shape
        L0 = cache.length
        if L0 + T > cache.capacity:
            from ..errors import UserError
            raise UserError(f"sequence of {L0 + T} tokens exceeds the context window of {cache.capacity}",
                            "shorten the prompt or lower --max-new-tokens")
        if positions is None:
            positions = self.default_positions(cache, T, B)
        new_valid = torch.ones(B, T, dtype=torch.bool) if input_valid is None else input_valid
        new = causal_mask(T).expand(B, T, T) if attn_mask is None else attn_mask.expand(B, T, T)
        new = (new & new_valid[:, None, :]) | torch.eye(T, dtype=torch.bool)
        allowed = torch.cat([cache.valid[:, None, :].expand(B, T, L0), new], dim=-1)  # (B, T, S)
        # additive float mask works for every attention implementation
        mask = torch.zeros(B, 1, T, L0 + T, dtype=self._dtype)
        mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(self._dtype).min)
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask,
                         use_cache=True, **{self._cache_kw: cache.cache})
        cache.valid = torch.cat([cache.valid, new_valid], dim=1)
        logits = out.logits
        if logits_for is not None:
            logits = logits[:, logits_for]
        return logits.float()
