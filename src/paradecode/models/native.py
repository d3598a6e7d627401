"""Native Llama-family backend with a preallocated static KV cache.

In the spirit of gpt-fast: plain PyTorch, fused QKV and gate/up projections,
explicit positions, one ``scaled_dot_product_attention`` call per layer over
the filled part of a preallocated cache. Covers Llama (incl. SmolLM2),
Mistral-style grouped-query attention and Qwen2 (q/k/v bias). RoPE scaling
follows the checkpoint's config through transformers' own RoPE initialisers,
so the frequencies are the ones transformers uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .base import CausalLM, KVCache, ModelInfo, causal_mask
from ..errors import UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    max_context: int
    qkv_bias: bool
    tie_embeddings: bool


class StaticKVCache(KVCache):
    """Preallocated keys/values: (layers, B, kv_heads, capacity, head_dim)."""

    def __init__(self, shape: LlamaShape, batch_size: int, capacity: int, dtype: torch.dtype):
        self.batch_size = batch_size
        self.capacity = capacity
        kv = (shape.layers, batch_size, shape.kv_heads, capacity, shape.head_dim)
        self.k = torch.zeros(kv, dtype=dtype)
        self.v = torch.zeros(kv, dtype=dtype)
        self.valid = torch.ones(batch_size, capacity, dtype=torch.bool)  # False: padding slot
        self._length = 0
        self._all_valid = True  # fast path: no padding anywhere in the filled part

    @property
    def length(self) -> int:
        return self._length

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot roll back to {length}: cache holds {self._length}")
        self._length = length
        if length == 0:
            self._all_valid = True

    def compact(self, start: int, keep: torch.Tensor | Sequence[int]) -> None:
        keep = torch.as_tensor(keep, dtype=torch.long)
        n = keep.numel()
        if start + n > self._length or (n and int(keep.max()) + start >= self._length):
            raise ValueError("compact indices beyond the filled cache")
        src = keep + start
        if n and not torch.equal(src, torch.arange(start, start + n)):
            self.k[:, :, :, start:start + n] = self.k[:, :, :, src]
            self.v[:, :, :, start:start + n] = self.v[:, :, :, src]
            self.valid[:, start:start + n] = self.valid[:, src]
        self._length = start + n


def _rope_inv_freq(hf_config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling exactly as transformers computes them."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers < 5
        scaling = getattr(hf_config, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        theta = getattr(hf_config, "rope_theta", 10000.0)
    else:
        rope_type = params.get("rope_type", "default")
        theta = params.get("rope_theta", 10000.0)
    if rope_type == "dynamic":
        raise UserError("dynamic RoPE scaling is not supported by the native backend",
                        "use --backend transformers for this model")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    if rope_type == "default":
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None)
    return inv.float(), float(scale)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # same arithmetic as transformers' LlamaRMSNorm (statistics in float32)
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class NativeLlama(CausalLM):
    """Llama / Mistral / Qwen2 decoder in plain PyTorch with a static cache."""

    def __init__(self, hf_config, weights: Mapping[str, torch.Tensor], *, dtype: str = "float32",
                 tokenizer=None, name: str = "model"):
        arch = (getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"architecture {arch} is not supported by the native backend",
                            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}; use --backend transformers for others")
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}", f"choose one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[dtype]
        c = hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        max_ctx = int(getattr(c, "max_position_embeddings", 2048))
        window = getattr(c, "sliding_window", None)
        if window and getattr(c, "use_sliding_window", arch == "MistralForCausalLM"):
            max_ctx = min(max_ctx, int(window))  # beyond the window attention would differ
        self.shape = s = LlamaShape(
            vocab_size=c.vocab_size, hidden=c.hidden_size, intermediate=c.intermediate_size,
            layers=c.num_hidden_layers, heads=c.num_attention_heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim, eps=float(c.rms_norm_eps), max_context=max_ctx,
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(c, "attention_bias", False)),
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        )
        self._load(weights)
        inv_freq, self.rope_scale = _rope_inv_freq(c)
        pos = torch.arange(max_ctx, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]                         # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)                          # (P, D)
        self.cos_table = (emb.cos() * self.rope_scale).to(self.dtype)
        self.sin_table = (emb.sin() * self.rope_scale).to(self.dtype)
        self.tokenizer = tokenizer
        eos = getattr(c, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos_ids = tuple(dict.fromkeys(eos_ids + (tokenizer.eos_token_id,)))
        pad = getattr(c, "pad_token_id", None)
        self.info = ModelInfo(
            name=name, architecture=arch, vocab_size=s.vocab_size, num_layers=s.layers,
            max_context=max_ctx, eos_token_ids=eos_ids,
            pad_token_id=int(pad if pad is not None else (eos_ids[0] if eos_ids else 0)),
            dtype=dtype, backend="native",
        )
        self.layers_all = tuple(range(s.layers))

    # -- weights -------------------------------------------------------------
    def _load(self, w: Mapping[str, torch.Tensor]) -> None:
        s, dt = self.shape, self.dtype

        def get(name: str) -> torch.Tensor:
            try:
                return w[name].to(dt).contiguous()
            except KeyError:
                raise UserError(f"weight {name} missing from the checkpoint",
                                "check that the model directory is a complete Llama-family checkpoint") from None

        self.embed = get("model.embed_tokens.weight")                    # (V, H)
        self.lm_head = self.embed if s.tie_embeddings or "lm_head.weight" not in w else get("lm_head.weight")
        self.norm = get("model.norm.weight")
        self.wqkv, self.bqkv, self.wo, self.wgu, self.wdown, self.ln1, self.ln2 = ([] for _ in range(7))
        for i in range(s.layers):
            p = f"model.layers.{i}."
            self.wqkv.append(torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
            self.bqkv.append(torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
                             if s.qkv_bias else None)
            self.wo.append(get(p + "self_attn.o_proj.weight"))
            self.wgu.append(torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]))
            self.wdown.append(get(p + "mlp.down_proj.weight"))
            self.ln1.append(get(p + "input_layernorm.weight"))
            self.ln2.append(get(p + "post_attention_layernorm.weight"))

    def weight_bytes(self) -> int:
        ts = [self.embed, self.norm, *self.wqkv, *self.wo, *self.wgu, *self.wdown, *self.ln1, *self.ln2]
        if self.lm_head is not self.embed:
            ts.append(self.lm_head)
        return sum(t.numel() * t.element_size() for t in ts)

    # -- interface -----------------------------------------------------------
    def new_cache(self, batch_size: int = 1, capacity: int | None = None) -> StaticKVCache:
        cap = min(capacity or self.shape.max_context, self.shape.max_context)
        return StaticKVCache(self.shape, batch_size, cap, self.dtype)

    @torch.inference_mode()
    def forward(self, cache, input_ids, positions=None, attn_mask=None, *, input_valid=None,
                logits_for=None, layers: Sequence[int] | None = None):
        """See :mod:`paradecode.models.base`. ``layers`` runs only those layers (self-speculation)."""
        s = self.shape
        B, T = input_ids.shape
        L0 = cache.length
        S = L0 + T
        if S > cache.capacity:
            raise UserError(f"sequence of {S} tokens exceeds the context window of {cache.capacity}",
                            "shorten the prompt or lower --max-new-tokens")
        if positions is None:
            positions = self.default_positions(cache, T, B)
        cos = self.cos_table[positions].unsqueeze(1)                     # (B, 1, T, D)
        sin = self.sin_table[positions].unsqueeze(1)

        # attention mask over the filled cache + the new block: (B, 1, T, S)
        if input_valid is not None:
            cache.valid[:, L0:S] = input_valid
            cache._all_valid = cache._all_valid and bool(input_valid.all())
        else:
            cache.valid[:, L0:S] = True
        mask = self._mask(cache, T, attn_mask, input_valid)

        x = F.embedding(input_ids, self.embed)                           # (B, T, H)
        Hq, Hkv, D = s.heads, s.kv_heads, s.head_dim
        for i in (self.layers_all if layers is None else layers):
            h = _rms_norm(x, self.ln1[i], s.eps)
            qkv = F.linear(h, self.wqkv[i], self.bqkv[i])                # (B, T, (Hq+2Hkv)*D)
            q, k, v = qkv.split((Hq * D, Hkv * D, Hkv * D), dim=-1)
            q = q.view(B, T, Hq, D).transpose(1, 2)                      # (B, Hq, T, D)
            k = k.view(B, T, Hkv, D).transpose(1, 2)                     # (B, Hkv, T, D)
            v = v.view(B, T, Hkv, D).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.k[i, :, :, L0:S] = k
            cache.v[i, :, :, L0:S] = v
            a = F.scaled_dot_product_attention(
                q, cache.k[i, :, :, :S], cache.v[i, :, :, :S], attn_mask=mask,
                scale=1.0 / math.sqrt(D), enable_gqa=Hq != Hkv)          # (B, Hq, T, D)
            x = x + F.linear(a.transpose(1, 2).reshape(B, T, Hq * D), self.wo[i])
            h = _rms_norm(x, self.ln2[i], s.eps)
            gate, up = F.linear(h, self.wgu[i]).chunk(2, dim=-1)         # (B, T, I) each
            x = x + F.linear(F.silu(gate) * up, self.wdown[i])
        cache._length = S
        if logits_for is not None:
            x = x[:, logits_for]
        x = _rms_norm(x, self.norm, s.eps)
        return F.linear(x, self.lm_head).float()                         # (B, T', V)

    @staticmethod
    def _mask(cache: StaticKVCache, T: int, attn_mask, input_valid) -> torch.Tensor | None:
        L0 = cache.length
        if attn_mask is None and T == 1 and cache._all_valid and (input_valid is None or bool(input_valid.all())):
            return None  # one token seeing everything: no mask needed
        B = cache.batch_size
        new = causal_mask(T).expand(B, T, T) if attn_mask is None else attn_mask.expand(B, T, T)
        if input_valid is not None:
            # nobody attends to padding, but every token sees itself (keeps pad rows finite)
            new = (new & input_valid[:, None, :]) | torch.eye(T, dtype=torch.bool)
        old = cache.valid[:, None, :L0].expand(B, T, L0)
        return torch.cat([old, new], dim=-1).unsqueeze(1)                # (B, 1, T, S)
