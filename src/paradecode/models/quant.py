"""Int8 weight-only quantization (one scale per output channel) for the native backend.

Why: on a CPU a decode step streams every weight once, so its time is bytes
read. Int8 halves the bytes of bfloat16. PyTorch ships a fused kernel,
``aten._weight_int8pack_mm(x bf16 (M, K), w int8 (N, K), scale bf16 (N,))``,
that dequantizes on the fly; it is fast for one or a few rows and slower than
bfloat16 for blocks of 16 rows and more (see ``docs/engine.md``).

Activations stay bfloat16, so this is "W8A16": rounding error comes from the
weights only. The scale is rounded to bfloat16 *before* the weights are
quantized against it, so the kernel's scale is the one the rounding assumed.

The module also holds the other weight layouts of the native engine: oneDNN's
prepacked bfloat16 (:class:`PackedBF16Weight`), int4 for PyTorch's kernel
(:class:`Int4Weight`) and for the compiled one (:class:`Int4W4A8Weight`), and
the compiled panel kernel's float32 and int8 panels (:class:`PanelWeight`:
:class:`F32PanelWeight`, :class:`Int8PanelWeight`: int8 matrices of widths the int8 kernel does not take), and
the int8 format's weights for the compiled int8 kernel (:class:`Int8I15Weight`, where the kernels build),
and the bfloat16 format's for the compiled bfloat16 kernel (:class:`BF16PanelWeight`: AMX tiles, AVX-512 BF16 or AVX2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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




@dataclass(frozen=True)
class PackedBF16Weight:
    """A bfloat16 (N, K) weight reordered once into oneDNN's blocked layout for its GEMM.

    ``F.linear`` on a plain bfloat16 tensor re-reads the weight in its strided
    layout every call (and takes a GEMV kernel for one row); the prepacked
    weight goes straight to oneDNN's AVX-512/AMX kernels. For the default
    model's 30 layers and LM head on the Intel Xeon here (1 thread): 42 ms for
    1 row and 49 ms for 16 with ``F.linear``, 28 ms for both prepacked. Each
    row's result is the same whether it comes alone or with up to 64 others
    (probed per shape anyway, see ``native._max_rows``). The packed tensor is
    opaque (no storage to view or save), so callers keep a plain copy where
    they need rows of it (a tied embedding).
    """

    w: torch.Tensor               # opaque mkldnn tensor, shape (N, K)

    @property
    def shape(self) -> torch.Size:
        return self.w.shape

    def nbytes(self) -> int:
        return self.w.numel() * 2


def can_pack_bf16() -> bool:
    """Whether this PyTorch build has oneDNN's prepacked bfloat16 linear and the CPU runs it natively."""
    mk = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mk, "_reorder_linear_weight")
            and hasattr(mk, "_linear_pointwise") and bool(mk._is_mkldnn_bf16_supported()))


PACK_HINT = 16      # the batch size oneDNN lays a packed weight out for (see pack_bf16)


def pack_bf16(w: torch.Tensor) -> PackedBF16Weight:
    """Reorder a (N, K) weight, as bfloat16, into oneDNN's layout for batches of ``PACK_HINT`` rows. On the
    Xeon with AMX a forward of the default model took 0.76-0.88x the time with the hint 16 than with the
    hint 1 for 1, 8 and 16 new tokens (interleaved, session 13); the row blocks that keep a one-token call's
    bits are probed on the packed kernel whatever the hint (native._max_rows)."""
    return PackedBF16Weight(torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16).contiguous(), PACK_HINT))


INT4_GROUP = 32     # weights per (scale, zero) pair along K, as GGUF's Q4_0/Q4_1 blocks
INT4_ROWS = 16      # the packing kernel wants N divisible by this


@dataclass(frozen=True)
class Int4Weight:
    """A (N, K) weight as 4-bit values with a bfloat16 scale and zero per group of 32 along K.

    ``w ≈ (q - 8) * scale + zero`` for ``q`` in 0..15 (what PyTorch's
    ``_weight_int4pack_mm_for_cpu`` computes), which is GGUF's Q4_1 block
    ``d * q + m`` with ``scale = d`` and ``zero = m + 8 d``. Rows are padded
    to a multiple of 16 for the packing; products are sliced back to N.
    """

    packed: torch.Tensor          # (Np, K/2) uint8, the kernel's packed layout
    scale_zero: torch.Tensor      # (K/G, Np, 2) bfloat16
    n: int                        # true number of output rows
    group: int = INT4_GROUP

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.packed.shape[1] * 2))

    def nbytes(self) -> int:
        return self.packed.numel() + self.scale_zero.numel() * self.scale_zero.element_size()


def int4_codes(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max 4-bit codes of ``w`` (N, K) per group of ``group`` along K.

    Returns ``(q (N, K) int32 in 0..15, scale (N, K/G) bfloat16, zero (N, K/G) bfloat16)``
    with ``w ≈ (q - 8) * scale + zero``. Scale and zero are rounded to
    bfloat16 first and the codes chosen against the rounded values. Weights
    that came from a Q4_1 GGUF block (``d * q + m``, all codes in use) get back
    their own codes and, up to bfloat16 rounding of d and m, their own values.
    """
    N, K = w.shape
    wg = w.float().reshape(N, K // group, group)                                  # (N, K/G, G)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15.0).clamp_(min=1e-12).to(torch.bfloat16)
    zero = (lo + 8.0 * scale.float()).to(torch.bfloat16)
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8.0).clamp_(0, 15)
    return q.to(torch.int32).reshape(N, K), scale, zero


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> Int4Weight:
    """Pack ``w`` (N, K) for the CPU int4 kernel (K must be a multiple of ``group``)."""
    N, K = w.shape
    if K % group:
        raise ValueError(f"int4 needs the input size ({K}) to be a multiple of {group}")
    Np = -(-N // INT4_ROWS) * INT4_ROWS
    packed, sz = [], []
    for r in range(0, Np, 4096):     # row blocks: float32 temporaries stay small (peak memory at load)
        block = w[r:r + 4096].float()
        if block.shape[0] < min(4096, Np - r):                                   # pad rows with zeros
            block = torch.cat([block, block.new_zeros(min(4096, Np - r) - block.shape[0], K)])
        q, scale, zero = int4_codes(block, group)
        packed.append(q)
        sz.append(torch.stack([scale, zero], -1).transpose(0, 1))               # (K/G, rows, 2)
    q = torch.cat(packed)
    return Int4Weight(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                      torch.cat(sz, dim=1).contiguous(), N, group)


W4A8_CHANNELS = 16  # output channels per packed group of the compiled int4 kernel
W4A8_BLOCK = 320    # bytes per (channel group, input group): 256 of codes, 16 bfloat16 scales, 16 zeros


@dataclass(frozen=True)
class Int4W4A8Weight:
    """The int4 format's (N, K) weight packed for the compiled kernel (``models/kernels/int4.c``):
    the codes, scales and zeros of :func:`int4_codes` (the same as :class:`Int4Weight`'s), in runs of
    320-byte blocks per group of 16 output channels. The kernel quantizes each row's groups of 32
    activations to int8 (GGUF's Q8 blocks) and sums exact integer dot products: int4 x int8, where
    PyTorch's kernel computes int4 x bfloat16."""

    blocks: torch.Tensor          # (Np/16, K/32, 320) uint8
    n: int                        # true number of output channels (Np: padded to a multiple of 16)
    group: int = INT4_GROUP

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.blocks.shape[1] * self.group))

    @property
    def padded(self) -> int:
        return self.blocks.shape[0] * W4A8_CHANNELS

    def nbytes(self) -> int:
        return self.blocks.numel()


def pack_int4_w4a8(w: torch.Tensor) -> Int4W4A8Weight:
    """Quantize ``w`` (N, K) as :func:`quantize_int4` does and pack it for the compiled W4A8 kernel."""
    return Int4W4A8Weight(_pack_int4_blocks(w, int4_codes), w.shape[0])


def _pack_int4_blocks(w: torch.Tensor, codes_of) -> torch.Tensor:
    """``w`` (N, K) as the int4 kernel's blocks, (Np/16, K/32, 320) uint8: ``codes_of`` gives (q, scale, zero)."""
    N, K = w.shape
    if K % INT4_GROUP:
        raise ValueError(f"int4 needs the input size ({K}) to be a multiple of {INT4_GROUP}")
    C, NB = W4A8_CHANNELS, K // INT4_GROUP
    G = -(-N // C)
    out = torch.empty(G, NB, W4A8_BLOCK, dtype=torch.uint8)
    step = max(1, 4096 // C)
    for g0 in range(0, G, step):          # channel groups in slices: float32 temporaries stay small
        g1 = min(G, g0 + step)
        block = w[g0 * C:g1 * C].float()
        if block.shape[0] < (g1 - g0) * C:                                           # pad channels with zeros
            block = torch.cat([block, block.new_zeros((g1 - g0) * C - block.shape[0], K)])
        q, scale, zero = codes_of(block)                      # (n, K) int32 0..15, (n, NB) 16-bit floats twice
        q = q.to(torch.uint8).view(g1 - g0, C, NB, 8, 4)      # [g, j, b, i, t]: input 32 b + 4 i + t
        q = q.permute(0, 2, 3, 1, 4)                          # [g, b, i, j, t]
        codes = (q[:, :, :4] | (q[:, :, 4:] << 4)).reshape(g1 - g0, NB, 16 * C)
        sz = torch.stack([scale, zero]).view(2, g1 - g0, C, NB).permute(1, 3, 0, 2)   # [g, b, 2, j]
        out[g0:g1, :, :16 * C] = codes
        out[g0:g1, :, 16 * C:] = sz.contiguous().view(torch.uint8).reshape(g1 - g0, NB, 4 * C)
    return out


@dataclass(frozen=True)
class Int4W4A16Weight(Int4W4A8Weight):
    """An (N, K) weight for the int4 kernel's A16 variant (``pd_int4_a16_mm``): the same 320-byte blocks and
    code layout, with a float16 scale and low per block, w = q * scale + low (:func:`int4_codes_f16`), and
    each row's groups of 32 activations quantized in two int8 levels (~16 bits). Weights that came from a
    Q4_1 GGUF block get back their exact values, and the products carry little more than float rounding:
    quantspec's twin of the default model agrees with its target where the W4A8 kernel's does not."""


def int4_codes_f16(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max 4-bit codes of ``w`` (N, K) per group of ``group`` along K, ``w ≈ q * scale + low``
    with ``scale`` and ``low`` (N, K/G) float16 (rounded first, the codes chosen against the rounded values).
    A Q4_1 block (``d * q + m``, codes 0 and 15 in use, as GGUF's quantizer makes them) gets back d, m and
    its codes exactly. Raises ValueError where a scale or low is beyond float16's range."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group, group)                                  # (N, K/G, G)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale, low = ((hi - lo) / 15.0).to(torch.float16), lo.to(torch.float16)
    if not (torch.isfinite(scale).all() and torch.isfinite(low).all()):
        raise ValueError("int4 with float16 scales needs weights within float16's range")
    s = scale.float()[..., None]
    q = torch.where(s > 0, torch.round((wg - low.float()[..., None]) / torch.where(s > 0, s, 1.0)), 0.0).clamp_(0, 15)
    return q.to(torch.int32).reshape(N, K), scale, low


def pack_int4_w4a16(w: torch.Tensor) -> Int4W4A16Weight:
    """Quantize ``w`` (N, K) with :func:`int4_codes_f16` and pack it for the int4 kernel's A16 variant."""
    return Int4W4A16Weight(_pack_int4_blocks(w, int4_codes_f16), w.shape[0])


F32_CHANNELS = 16   # output channels per panel of the compiled float32 kernel


@dataclass(frozen=True)
class PanelWeight:
    """A (N, K) weight in the compiled panel kernel's layout (``models/kernels/panels.c``): output channels in
    panels of 16 (N padded with zero channels), each panel K vectors of its 16 channels' weights for one
    input. Only the order in memory differs from the plain matrix."""

    panels: torch.Tensor          # (Np/16, K, 16)
    n: int                        # true number of output channels

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.panels.shape[1]))

    @property
    def padded(self) -> int:
        return self.panels.shape[0] * F32_CHANNELS

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.panels[ids // F32_CHANNELS, :, ids % F32_CHANNELS]            # (*ids, K)

    def _matrix(self) -> torch.Tensor:
        return self.panels.transpose(1, 2).reshape(-1, self.panels.shape[1])[:self.n]   # (N, K)


@dataclass(frozen=True)
class F32PanelWeight(PanelWeight):
    """A float32 :class:`PanelWeight`: the same values as the plain matrix."""

    def nbytes(self) -> int:
        return self.panels.numel() * 4

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape) of the plain matrix: an embedding lookup without a second copy."""
        return self._rows(ids)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._matrix().to(dtype)


def _panels(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` (N, K) reordered into (Np/16, K, 16) panels of ``dtype`` (zero channels pad N)."""
    N, K = w.shape
    Np = -(-N // F32_CHANNELS) * F32_CHANNELS
    panels = torch.zeros(Np // F32_CHANNELS, K, F32_CHANNELS, dtype=dtype)
    step = 4096 // F32_CHANNELS
    for g0 in range(0, Np // F32_CHANNELS, step):      # in slices: float32 temporaries stay small
        block = w[g0 * F32_CHANNELS:(g0 + step) * F32_CHANNELS].to(dtype)
        n = block.shape[0] // F32_CHANNELS * F32_CHANNELS
        g1 = g0 + n // F32_CHANNELS
        panels[g0:g1] = block[:n].view(-1, F32_CHANNELS, K).transpose(1, 2)
        if n < block.shape[0]:                                                   # a last, partial panel
            panels[g1, :, :block.shape[0] - n] = block[n:].T
    return panels


def pack_f32(w: torch.Tensor) -> F32PanelWeight:
    """``w`` (N, K) as float32 panels for the compiled panel kernel."""
    return F32PanelWeight(_panels(w, torch.float32), w.shape[0])


@dataclass(frozen=True)
class BF16PanelWeight(PanelWeight):
    """A (N, K) weight as bfloat16 for the compiled bfloat16 kernel (``models/kernels/bf16.c``: vdpbf16ps, or AVX2):
    output channels in panels of 16, each panel K/2 rows of 32 values, row p holding inputs 2p, 2p + 1 of its
    16 channels (channel-major pairs; K padded to even with a zero input). The same values as the matrix cast
    to bfloat16 (denormals flushed to zero); ``float_out``: float32 outputs (an LM head's logits), else the
    activations' dtype."""

    k: int = field(kw_only=True)                 # true number of inputs
    float_out: bool = field(kw_only=True, default=False)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.k))

    def nbytes(self) -> int:
        return self.panels.numel() * 2

    def _pairs(self, ids: torch.Tensor) -> torch.Tensor:
        P, K2, _ = self.panels.shape
        v = self.panels.view(P, K2, F32_CHANNELS, 2)[ids // F32_CHANNELS, :, ids % F32_CHANNELS]   # (*ids, K2, 2)
        return v.flatten(-2)[..., :self.k]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape) of the matrix as float32: an embedding lookup without a second copy."""
        return self._pairs(ids).float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        P, K2, _ = self.panels.shape
        m = self.panels.view(P, K2, F32_CHANNELS, 2).permute(0, 2, 1, 3).reshape(P * F32_CHANNELS, 2 * K2)
        return m[:self.n, :self.k].to(dtype)


BF16_TINY = 2.0 ** -126   # the smallest normal float32 / bfloat16


def pack_bf16_panels(w: torch.Tensor, float_out: bool = False) -> BF16PanelWeight:
    """``w`` (N, K) cast to bfloat16 (to nearest even; denormals to zero) in pair panels for the compiled
    bfloat16 kernel."""
    N, K = w.shape
    C, K2 = F32_CHANNELS, -(-K // 2)
    Np = -(-N // C) * C
    panels = torch.zeros(Np // C, K2, 2 * C, dtype=torch.bfloat16)
    step = 4096 // C
    for g0 in range(0, Np // C, step):                 # in slices: temporaries stay small
        g1 = min(Np // C, g0 + step)
        block = torch.zeros((g1 - g0) * C, 2 * K2, dtype=torch.bfloat16)
        rows = w[g0 * C:g1 * C]
        b = rows.to(torch.bfloat16)
        block[:rows.shape[0], :K] = b.masked_fill(b.abs() < BF16_TINY, 0)     # denormals: zero, as vdpbf16ps reads them
        panels[g0:g1] = block.view(g1 - g0, C, K2, 2).permute(0, 2, 1, 3).reshape(g1 - g0, K2, 2 * C)
    return BF16PanelWeight(panels, N, k=K, float_out=float_out)


@dataclass(frozen=True)
class Int8PanelWeight(PanelWeight):
    """An :class:`Int8Weight` as a :class:`PanelWeight`: the same int8 values, the bfloat16 scales held as
    float32 (the same values). The kernel sums float32 products of the activations and the int8 values,
    then multiplies by the scale; ``float_out``: float32 outputs (an LM head's logits), else the
    activations' dtype."""

    scale: torch.Tensor = field(kw_only=True)    # (Np,) float32 (zero for padding channels)
    float_out: bool = field(kw_only=True, default=False)

    def nbytes(self) -> int:
        return self.panels.numel() + self.scale.numel() * 4

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``ids`` (any shape) as float32: an embedding lookup."""
        return self._rows(ids).float() * self.scale[ids].unsqueeze(-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self._matrix().float() * self.scale[:self.n, None]).to(dtype)


def pack_int8_panels(w: Int8Weight, float_out: bool = False) -> Int8PanelWeight:
    """An :class:`Int8Weight` (from :func:`quantize_int8`) in panels for the compiled panel kernel."""
    panels = _panels(w.q, torch.int8)
    scale = torch.zeros(panels.shape[0] * F32_CHANNELS)
    scale[:w.q.shape[0]] = w.scale.float()
    return Int8PanelWeight(panels, w.q.shape[0], scale=scale, float_out=float_out)


@dataclass(frozen=True)
class Int8I15Weight:
    """An :class:`Int8Weight` packed for the compiled int8 kernel (``models/kernels/int8.c``): output channels
    in panels of 16, each panel K/4 rows of 64 bytes (row i: inputs 4i .. 4i + 3 of the 16 channels,
    channel-major), every value stored plus 128 as an unsigned byte; the bfloat16 scales held as float32
    (the same values). The kernel scales each row of activations to 15-bit integers and sums exact integer
    dot products (on AMX tiles for blocks of rows where the CPU has them); ``float_out``: float32 outputs
    (an LM head's logits), else the activations' dtype."""

    panels: torch.Tensor          # (Np/16, K/4, 64) uint8
    scale: torch.Tensor           # (Np,) float32 (zero for padding channels)
    n: int                        # true number of output channels
    float_out: bool = False

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.panels.shape[1] * 4))

    @property
    def padded(self) -> int:
        return self.panels.shape[0] * F32_CHANNELS

    def nbytes(self) -> int:
        return self.panels.numel() + self.scale.numel() * 4

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``ids`` (any shape) as float32: an embedding lookup."""
        p, j = ids // F32_CHANNELS, ids % F32_CHANNELS
        v = self.panels[p[..., None], :, 4 * j[..., None] + torch.arange(4)]        # (*ids, 4, K/4)
        return (v.transpose(-1, -2).flatten(-2).float() - 128.0) * self.scale[ids].unsqueeze(-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        P, R, _ = self.panels.shape
        u = self.panels.view(P, R, F32_CHANNELS, 4).permute(0, 2, 1, 3).reshape(P * F32_CHANNELS, R * 4)
        return ((u[:self.n].float() - 128.0) * self.scale[:self.n, None]).to(dtype)


def pack_int8_i15(w: Int8Weight, float_out: bool = False) -> Int8I15Weight:
    """An :class:`Int8Weight` (from :func:`quantize_int8`) packed for the compiled int8 kernel (K a multiple of 4)."""
    N, K = w.q.shape
    if K % 4:
        raise ValueError(f"the int8 kernel needs the input size ({K}) to be a multiple of 4")
    C = F32_CHANNELS
    Np = -(-N // C) * C
    panels = torch.empty(Np // C, K // 4, 4 * C, dtype=torch.uint8)
    step = 4096 // C
    for g0 in range(0, Np // C, step):                 # in slices: temporaries stay small
        g1 = min(Np // C, g0 + step)
        block = torch.zeros((g1 - g0) * C, K, dtype=torch.int16)
        rows = w.q[g0 * C:g1 * C]
        block[:rows.shape[0]] = rows
        u = (block + 128).to(torch.uint8).view(g1 - g0, C, K // 4, 4).permute(0, 2, 1, 3)
        panels[g0:g1] = u.reshape(g1 - g0, K // 4, 4 * C)
    scale = torch.zeros(Np)
    scale[:N] = w.scale.float()
    return Int8I15Weight(panels, scale, N, float_out)


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that also takes a :class:`PackedBF16Weight`, :class:`Int8Weight`, :class:`Int4Weight`
    or :class:`Int4W4A8Weight` (then ``x`` must be bfloat16), an :class:`F32PanelWeight` or
    :class:`Int8PanelWeight` (the compiled panel kernel), an :class:`Int8I15Weight` (the int8 kernel) or a
    :class:`BF16PanelWeight` (the bfloat16 kernel)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    if isinstance(w, PackedBF16Weight):
        return torch.ops.mkldnn._linear_pointwise(x, w.w, bias, "none", [], "")
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if isinstance(w, (Int4W4A8Weight, PanelWeight, Int8I15Weight)):
        from . import kernels

        if isinstance(w, Int8I15Weight):
            y = kernels.i8_i15_mm(x2, w, torch.float32 if w.float_out else x2.dtype)
        elif isinstance(w, Int4W4A8Weight):
            y = kernels.int4_mm(x2, w)
        elif isinstance(w, F32PanelWeight):
            y = kernels.f32_mm(x2, w)
        elif isinstance(w, BF16PanelWeight):
            y = kernels.bf16_mm(x2, w, torch.float32 if w.float_out else x2.dtype)
        else:
            y = kernels.i8_mm(x2, w, torch.float32 if w.float_out else x2.dtype)
    elif isinstance(w, Int8Weight):
        y = torch.ops.aten._weight_int8pack_mm(x2, w.q, w.scale)                          # (M, N)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), w.packed, w.group, w.scale_zero)
        if y.shape[1] != w.n:
            y = y[:, :w.n]                                                             # drop padding rows
    if x.dim() != 2:
        y = y.view(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def first_channels(w, n: int):
    """The weight of ``w``'s first ``n`` output channels, as a view (no copy), or None for a layout that has
    no such view (oneDNN's prepacked bfloat16, PyTorch's int4 tiles). ``n``: a multiple of 16, at most N.

    What a draft vocabulary (``drafters/vocab.py``) scores: the panels hold 16 channels each, in order, so
    the first ``n`` channels are the first ``n / 16`` panels."""
    if n % F32_CHANNELS or not 0 < n <= w.shape[0]:
        raise ValueError(f"n must be a multiple of {F32_CHANNELS} in 1..{w.shape[0]}, got {n}")
    if isinstance(w, torch.Tensor):
        return w[:n]
    if isinstance(w, Int8Weight):
        return Int8Weight(w.q[:n], w.scale[:n])
    if isinstance(w, (PanelWeight, Int8I15Weight)):
        fields = {"panels": w.panels[:n // F32_CHANNELS], "n": n}
        if hasattr(w, "scale"):
            fields["scale"] = w.scale[:n]
        return dataclasses.replace(w, **fields)
    return None
