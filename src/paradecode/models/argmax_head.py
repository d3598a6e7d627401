"""Greedy decoding's LM head: the exact argmax without all the exact logits.

A greedy step needs one thing from the LM head: which token has the largest logit. On a CPU the head is
a matrix-vector product that reads its whole matrix (the default model: 28 M weights, 57 MB in bfloat16,
113 MB in float32) for that one answer. :class:`ArgmaxHead` reads an int8 copy instead (the int8 kernel,
``kernels/int8.c``: 15-bit activations, exact integer sums), bounds how far each approximate logit can be
from the exact one, and computes the exact logits (the model's own head, the same kernel on the same
panels, so the same bits) only for the tokens whose interval can still hold the maximum.

For token v with exact weights w (what the model's kernel multiplies) and int8 weights ŵ, and the head's
input x with its 15-bit form x̂ (``|x̂ - x| <= 0.51 d``, ``d = max |x| / 16319``), the approximate logit
``a = ŵ · x̂`` (exact integer sums, then two float roundings) and the exact kernel's logit ``z`` satisfy

    |a - z| <= ||ŵ - w||₂ ||x̂||₂ + ||w||₁ 0.51 d + 2 γ ||w||₂ ||x||₂ + 4 u max |a| + 2^-100 (||w||₁ + 1)

(Cauchy-Schwarz for the weights' rounding, the activations' rounding element by element, γ = (K + 2) u /
(1 - (K + 2) u) for the exact kernel's float sums in any order, u = 2^-24 for the approximate one's last
roundings, and a term for denormals an exact kernel may read as zero), widened once more for the float32
arithmetic of the bound itself. With ε_v that bound, every token outside C = {v : a_v + ε_v >= max_u (a_u -
ε_u)} has an exact logit below that of the u attaining the maximum, which is in C: the argmax, ties to the
lowest id as ``torch.argmax`` breaks them, is the argmax over C. The logits returned are the exact ones on
the 16-channel panels that hold C and -inf elsewhere, so a caller that takes the argmax of each row gets
plain decoding's token, bit for bit. Anything else (sampling, top-k) needs the full logits: only callers
that read nothing but the argmax ask for these (:meth:`CausalLM.forward_greedy`).

On the default model the candidates are few (chat prompts, 3 109 rows: median 3, 90th percentile 12, at
most 85; whole panels: a few dozen channels), and a row that would need more than a quarter of the panels,
or whose numbers are not finite, falls back to the full head.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .quant import F32_CHANNELS, Int8I15Weight, linear, pack_int8_i15, quantize_int8

U = 2.0 ** -24          # float32's unit roundoff
QMAX = 16319            # int8.c's 15-bit activation range
ROUND = 0.51            # |x̂ - x| <= ROUND d: half a step, plus the division's rounding
MAX_PANEL_SHARE = 0.25  # beyond this share of the head's panels a row costs as much as the full head


@dataclass(frozen=True)
class ArgmaxHead:
    """An int8 copy of a panel-layout LM head with the per-token constants of the bound above."""

    approx: Int8I15Weight     # the int8 copy (float32 logits)
    coef: torch.Tensor        # (V, 4) float32: ||ŵ - w||₂, ||w||₁, ||w||₂, ||w||₁ + 1, each rounded up
    vocab: int
    k: int

    @classmethod
    def build(cls, head) -> "ArgmaxHead":
        """From the model's exact head, a :class:`~paradecode.models.quant.PanelWeight` (float32 or bfloat16
        panels): its rows are what its kernel multiplies, so the bound holds for those bits."""
        V, K = head.shape
        C = F32_CHANNELS
        panels = torch.empty(-(-V // C), K // 4, 4 * C, dtype=torch.uint8)
        scale = torch.zeros(panels.shape[0] * C)
        coef = torch.empty(V, 4)
        for r in range(0, V, 4096):       # in row blocks (a multiple of 16): temporaries stay small
            w = head.rows(torch.arange(r, min(V, r + 4096))).float()
            q = quantize_int8(w)
            err = (q.q.double() * q.scale.double()[:, None] - w.double()).norm(dim=1)
            l1 = w.double().abs().sum(1)
            coef[r:r + len(w)] = (torch.stack([err, l1, w.double().norm(dim=1), l1 + 1], 1) * (1 + 1e-6)).float()
            block = pack_int8_i15(q)
            panels[r // C:r // C + block.panels.shape[0]] = block.panels
            scale[r:r + len(block.scale)] = block.scale
        return cls(Int8I15Weight(panels, scale, V, float_out=True), coef, V, K)

    def nbytes(self) -> int:
        return self.approx.nbytes() + self.coef.numel() * 4

    def logits(self, h: torch.Tensor, head) -> torch.Tensor:
        """Logits (R, V) of the final norm's output h (R, K) whose argmax per row is the exact head's: the
        exact logits on the panels that can hold it, -inf elsewhere (or every exact logit, for rows where
        the bound does not narrow it down)."""
        V, K = self.vocab, self.k
        a = linear(h, self.approx)[:, :V].T                                         # (V, R) float32
        x = h.float()
        d = x.abs().amax(1) / QMAX                                                  # (R,)
        nx = x.norm(dim=1)
        gamma = (K + 2) * U / (1 - (K + 2) * U)
        c = torch.stack([nx + K ** 0.5 * ROUND * d, ROUND * d, 2 * gamma * nx, torch.full_like(nx, 2.0 ** -100)])
        top = float(a.abs().amax())                  # inf or nan: some approximate logit is not finite
        if not (math.isfinite(top) and math.isfinite(float(nx.max()))):
            return linear(h, head)[:, :V].float()
        eps = torch.mm(self.coef, c.mul_(1.01)).add_(top * (4 * U + 1e-5))         # (V, R)
        lo = (a - eps).amax(0)                                                     # (R,)
        P = -(-V // F32_CHANNELS)
        hit = torch.zeros(P * F32_CHANNELS, dtype=torch.bool)
        hit[:V] = (a + eps >= lo).any(1)                                           # tokens any row may pick
        panels = torch.nonzero(hit.view(P, F32_CHANNELS).any(1))[:, 0]             # ascending
        if len(panels) > MAX_PANEL_SHARE * P:
            return linear(h, head)[:, :V].float()
        sub = dataclasses.replace(head, panels=head.panels[panels], n=len(panels) * F32_CHANNELS)
        ids = (panels[:, None] * F32_CHANNELS + torch.arange(F32_CHANNELS)).reshape(-1)   # ascending
        keep = ids < V                                                             # not the padding channels
        out = torch.full((h.shape[0], V), float("-inf"))
        out[:, ids[keep]] = linear(h, sub).float()[:, keep]
        return out
