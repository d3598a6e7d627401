"""Masked diffusion language model: a bidirectional Llama-family transformer.

The same blocks as the autoregressive backend (:mod:`paradecode.models.native`:
RMSNorm, rotary embeddings, fused QKV and gate/up projections, SDPA) with
*bidirectional* attention: every position sees every other one, and the model
predicts a token for every ``<mask>`` slot at once (LLaDA, Nie et al., 2025).

Approximate KV cache (Fast-dLLM, Wu et al., 2025): the forward takes
``context`` — keys/values of positions that are *not* recomputed — and
returns the keys/values of the positions it did compute. Because attention is
bidirectional, reusing cached keys/values of positions that have changed (or
whose context has changed) is an approximation; reusing them when nothing
changed is exact. :class:`BlockKVCache` implements the two Fast-dLLM modes:

* ``prefix`` — cache everything before the current block; each step
  recomputes the block and the (masked) suffix.
* ``dual`` — also cache the masked suffix; each step recomputes only the block.

Both refresh the whole cache with one full forward at every block boundary.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..models.native import _rms_norm, _rotate_half

KV = list[tuple[torch.Tensor, torch.Tensor]]       # per layer: k, v each (B, Hkv, T, D), RoPE applied
CacheMode = Literal["none", "prefix", "dual"]
WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class DiffusionShape:
    vocab_size: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float = 1e-5
    rope_theta: float = 10000.0
    max_context: int = 64
    mask_id: int = 1
    eos_id: int = 2
    pad_id: int = 0


class MaskedDiffusionLM(Protocol):
    """What the samplers need from a diffusion model."""

    shape: DiffusionShape

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
                context: KV | None = None, key_valid: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, KV]:
        """Logits (B, T, V) for every slot of ``ids`` (B, T) and the keys/values computed."""


class DiffusionTransformer(nn.Module):
    """Bidirectional Llama-style transformer; parameters use the native backend's fused layout."""

    def __init__(self, shape: DiffusionShape):
        super().__init__()
        s = self.shape = shape
        Hq, Hkv, D = s.heads, s.kv_heads, s.head_dim
        self.embed = nn.Parameter(torch.randn(s.vocab_size, s.hidden) * 0.02)            # (V, H)
        self.wqkv = nn.ParameterList([nn.Parameter(torch.randn((Hq + 2 * Hkv) * D, s.hidden) / math.sqrt(s.hidden))
                                      for _ in range(s.layers)])
        self.wo = nn.ParameterList([nn.Parameter(torch.randn(s.hidden, Hq * D) / math.sqrt(Hq * D * 2 * s.layers))
                                    for _ in range(s.layers)])
        self.wgu = nn.ParameterList([nn.Parameter(torch.randn(2 * s.intermediate, s.hidden) / math.sqrt(s.hidden))
                                     for _ in range(s.layers)])
        self.wdown = nn.ParameterList([nn.Parameter(torch.randn(s.hidden, s.intermediate)
                                                    / math.sqrt(s.intermediate * 2 * s.layers))
                                       for _ in range(s.layers)])
        self.ln1 = nn.ParameterList([nn.Parameter(torch.ones(s.hidden)) for _ in range(s.layers)])
        self.ln2 = nn.ParameterList([nn.Parameter(torch.ones(s.hidden)) for _ in range(s.layers)])
        self.norm = nn.Parameter(torch.ones(s.hidden))
        self.lm_head = nn.Parameter(torch.randn(s.vocab_size, s.hidden) * 0.02)          # (V, H)
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
        freqs = torch.arange(s.max_context, dtype=torch.float32)[:, None] * inv[None, :]  # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)                                          # (P, D)
        self.register_buffer("cos_table", emb.cos(), persistent=False)
        self.register_buffer("sin_table", emb.sin(), persistent=False)

    def forward(self, ids, positions=None, context: KV | None = None, key_valid=None):
        """Bidirectional forward.

        ids: (B, T) tokens to compute; positions: (B, T) or (T,) their absolute positions
        (default 0..T-1); context: per-layer cached (k, v) of other positions, (B, Hkv, Tc, D);
        key_valid: (B, Tc + T) False for padding keys (training batches only).
        Returns logits (B, T, V) float32 and the per-layer (k, v) of the T computed positions.
        """
        s = self.shape
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T)
        cos = self.cos_table[positions]                                  # (B?, T, D)
        sin = self.sin_table[positions]
        if cos.dim() == 2:
            cos, sin = cos[None, None], sin[None, None]                  # (1, 1, T, D)
        else:
            cos, sin = cos[:, None], sin[:, None]                        # (B, 1, T, D)
        mask = None if key_valid is None else key_valid[:, None, None, :]   # (B, 1, 1, S)
        x = F.embedding(ids, self.embed)                                 # (B, T, H)
        Hq, Hkv, D = s.heads, s.kv_heads, s.head_dim
        new_kv: KV = []
        for i in range(s.layers):
            h = _rms_norm(x, self.ln1[i], s.eps)
            q, k, v = F.linear(h, self.wqkv[i]).split((Hq * D, Hkv * D, Hkv * D), dim=-1)
            q = q.view(B, T, Hq, D).transpose(1, 2)                      # (B, Hq, T, D)
            k = k.view(B, T, Hkv, D).transpose(1, 2)                     # (B, Hkv, T, D)
            v = v.view(B, T, Hkv, D).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            new_kv.append((k, v))
            if context is not None:
                k = torch.cat([context[i][0], k], dim=2)                 # (B, Hkv, Tc + T, D)
                v = torch.cat([context[i][1], v], dim=2)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(D),
                                               enable_gqa=Hq != Hkv)     # (B, Hq, T, D), no causal mask
            x = x + F.linear(a.transpose(1, 2).reshape(B, T, Hq * D), self.wo[i])
            h = _rms_norm(x, self.ln2[i], s.eps)
            gate, up = F.linear(h, self.wgu[i]).chunk(2, dim=-1)         # (B, T, I) each
            x = x + F.linear(F.silu(gate) * up, self.wdown[i])
        x = _rms_norm(x, self.norm, s.eps)
        return F.linear(x, self.lm_head).float(), new_kv                 # (B, T, V)

    # -- persistence -------------------------------------------------------------
    def save(self, path: Path, meta: dict | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"shape": json.dumps(asdict(self.shape)), **{k: str(v) for k, v in (meta or {}).items()}})

    @classmethod
    def load(cls, path: Path) -> "DiffusionTransformer":
        """A model saved by :meth:`save`; a UserError naming the file when it is not one."""
        from safetensors.torch import load_file

        path = Path(path)
        shape = read_shape(path)
        try:
            weights = load_file(str(path))
        except Exception as e:                       # noqa: BLE001  (safetensors raises its own error types)
            raise _not_weights(path, f"cannot read its tensors: {str(e).splitlines()[0]}") from None
        _check_tensors(path, shape, {k: tuple(v.shape) for k, v in weights.items()})
        model = cls(shape)
        model.load_state_dict(weights)
        return model.eval().requires_grad_(False)


_WEIGHTS_FIX = "pass a .safetensors file written by `paradecode diffusion train`"


def _not_weights(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not paradecode diffusion weights: {why}", _WEIGHTS_FIX, field="weights")


def read_shape(path: Path) -> DiffusionShape:
    """The :class:`DiffusionShape` stored in a diffusion weights file's metadata, the file checked to be one."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise UserError(f"diffusion weights {path} is a folder", _WEIGHTS_FIX, field="weights")
    if not path.is_file():
        raise UserError(f"diffusion weights {path} not found", _WEIGHTS_FIX, field="weights")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:                           # noqa: BLE001  (SafetensorError, OSError, ...)
        raise _not_weights(path, f"not a whole safetensors file ({str(e).splitlines()[0]})") from None
    if "shape" not in meta:
        raise _not_weights(path, "a safetensors file without the diffusion model's \"shape\" metadata "
                                 "(another model's weights?)")
    try:
        shape = DiffusionShape(**json.loads(meta["shape"]))
    except (ValueError, TypeError) as e:
        raise _not_weights(path, f"its \"shape\" metadata is malformed ({e})") from None
    sizes = (shape.vocab_size, shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads,
             shape.head_dim, shape.max_context)
    ids = (shape.mask_id, shape.eos_id, shape.pad_id)
    if not all(isinstance(n, int) and n >= 1 for n in sizes) or shape.heads % shape.kv_heads \
            or not all(isinstance(i, int) and 0 <= i < shape.vocab_size for i in ids) \
            or not all(isinstance(x, (int, float)) and x > 0 for x in (shape.eps, shape.rope_theta)):
        raise _not_weights(path, f"its \"shape\" metadata is not a valid model shape ({shape})")
    return shape


def _check_tensors(path: Path, shape: DiffusionShape, found: dict[str, tuple[int, ...]]) -> None:
    """The tensors a file holds must be exactly the parameters of a model of ``shape``."""
    with torch.device("meta"):                       # shapes only, no memory
        want = {k: tuple(v.shape) for k, v in DiffusionTransformer(shape).state_dict().items()}
    missing = sorted(set(want) - set(found))
    if missing:
        raise _not_weights(path, f"tensor {missing[0]!r} is missing")
    extra = sorted(set(found) - set(want))
    if extra:
        raise _not_weights(path, f"unexpected tensor {extra[0]!r}")
    bad = [k for k in want if want[k] != found[k]]
    if bad:
        raise _not_weights(path, f"tensor {bad[0]!r} has shape {list(found[bad[0]])}, its metadata says "
                                 f"{list(want[bad[0]])}")


def load_shipped(name: str = "tasks") -> DiffusionTransformer:
    """The diffusion model trained by this project and shipped in the package (see docs/diffusion.md)."""
    return DiffusionTransformer.load(WEIGHTS_DIR / f"{name}.safetensors")


class BlockKVCache:
    """Fast-dLLM approximate cache around a full sequence ``x`` (B, L) and one block [s, e).

    ``refresh`` runs the full forward (exact) and stores every position's keys/values;
    ``logits`` then returns logits for ``rows`` — [s, L) in prefix mode, [s, e) in dual mode —
    recomputing only those positions against the cached rest. Mode ``none`` always runs the
    full forward. Logits are returned for the whole sequence (B, L, V); rows that were not
    recomputed hold the values from the last refresh.
    """

    def __init__(self, model: MaskedDiffusionLM, mode: CacheMode = "none"):
        if mode not in ("none", "prefix", "dual"):
            raise UserError(f"unknown cache mode {mode!r}", "choose one of none, prefix, dual", field="cache")
        self.model, self.mode = model, mode
        self.kv: KV | None = None
        self.logits: torch.Tensor | None = None
        self.block: tuple[int, int] | None = None

    def refresh(self, x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
        self.logits, self.kv = self.model.forward(x)                     # (B, L, V)
        self.block = block
        return self.logits

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Logits after the block changed (one model call)."""
        if self.mode == "none" or self.kv is None:
            return self.refresh(x, self.block)
        s, e = self.block
        L = x.shape[1]
        lo, hi = (s, L) if self.mode == "prefix" else (s, e)
        context = [(torch.cat([k[:, :, :lo], k[:, :, hi:]], dim=2), torch.cat([v[:, :, :lo], v[:, :, hi:]], dim=2))
                   for k, v in self.kv]                                  # (B, Hkv, L - (hi - lo), D)
        part, _ = self.model.forward(x[:, lo:hi], positions=torch.arange(lo, hi), context=context)
        logits = self.logits.clone()
        logits[:, lo:hi] = part                                          # (B, L, V)
        return logits
