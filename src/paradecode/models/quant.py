"""Int8 weight-only quantization (one scale per output channel) for the native backend.

Why: on a CPU a decode step streams every weight once, so its time is bytes
read. Int8 halves the bytes of bfloat16. PyTorch ships a fused kernel,
``aten._weight_int8pack_mm(x bf16 (M, K), w int8 (N, K), scale bf16 (N,))``,
that dequantizes on the fly; it is fast for one or a few rows and slower than
bfloat16 for blocks of 16 rows and more (see ``docs/engine.md``).

Activations stay bfloat16, so this is "W8A16": rounding error comes from the
weights only. The scale is rounded to bfloat16 *before* the weights are
quantized against it, so the kernel's scale is the one the rounding assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Int8Weight:
    """A (N, K) weight as int8 values and a per-row scale: w ≈ q * scale[:, None]."""

    q: torch.Tensor       # (N, K) int8
    scale: torch.Tensor   # (N,) bfloat16

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(dtype)          # (N, K)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``ids`` (any shape) as float32: an embedding lookup."""
        return self.q[ids].float() * self.scale[ids].float().unsqueeze(-1)       # (*ids, K)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 (values in [-127, 127])."""
    N = w.shape[0]
    q = torch.empty(w.shape, dtype=torch.int8)                                   # (N, K)
    scale = torch.empty(N, dtype=torch.bfloat16)                                 # (N,)
    for r in range(0, N, 4096):  # in row blocks: float32 temporaries stay small (peak memory at load)
        w32 = w[r:r + 4096].float()
        s = (w32.abs().amax(dim=1) / 127.0).clamp_(min=1e-12).to(torch.bfloat16)
        q[r:r + 4096] = torch.round(w32 / s.float()[:, None]).clamp_(-127, 127)
        scale[r:r + 4096] = s
    return Int8Weight(q, scale)


def linear(x: torch.Tensor, w: torch.Tensor | Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that also takes an :class:`Int8Weight` (then ``x`` must be bfloat16)."""
    if not isinstance(w, Int8Weight):
        return F.linear(x, w, bias)
    lead = x.shape[:-1]
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w.q, w.scale)  # (M, N)
    y = y.view(*lead, y.shape[-1])
    return y if bias is None else y + bias
