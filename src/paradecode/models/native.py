"""Native Llama-family backend with a preallocated static KV cache.

In the spirit of gpt-fast: plain PyTorch, fused QKV and gate/up projections,
explicit positions. Covers Llama (incl. SmolLM2), Mistral-style grouped-query
attention and Qwen2 (q/k/v bias). RoPE scaling follows the checkpoint's
config through transformers' own RoPE initialisers, so the frequencies are
the ones transformers uses.

Weight formats (``dtype``): ``float32``; ``bfloat16``; ``int8`` (per output
channel; activations as 15-bit integers with the compiled kernels of :mod:`.kernels`,
bfloat16 without, see :mod:`.quant`); ``int4`` (groups of 32; int8 activations with
the compiled kernels, bfloat16 without). Whatever the
format, the residual stream, RoPE, the KV cache and attention run in float32:
they are a small share of the work and keep the low-precision formats close
to float32.

Why the engine looks the way it does (measurements in ``docs/engine.md``):

* a decode step streams every weight once, so it is memory bound; a block of
  up to ~16 new tokens costs little more than one token, which is what makes
  verification nearly free;
* attention of a short block against the cache is two small matmuls, with
  grouped-query heads folded into the query rows ((B, Hkv, G*T, D) against
  (B, Hkv, S, D)) instead of expanding K/V, and one additive mask shared by
  every layer;
* *position invariance*: a token's logits do not depend on how many tokens
  share its call (greedy verification must reproduce plain one-token decoding
  bit for bit, not only up to rounding). The bfloat16 and int8 kernels
  compute each row independently, but only within one kernel: float32 GEMM
  (MKL) switches kernels below 4 rows, bfloat16 (oneDNN) for a single row
  (its GEMV sums long rows in another order), and threaded MKL deals rows out
  in blocks of 4, so a block of 6 rows ends in a 2-row GEMM. So float32 and
  bfloat16 products through PyTorch always get a multiple of 4 rows, padded
  with zero rows; the compiled kernels (float32, bfloat16, int8, int4)
  compute every row alone and need no padding. Larger blocks switch kernels too, at
  row counts that depend on the CPU, the shape and the thread count (on an
  Intel Xeon, MKL float32 at 16 rows for K = 576): a block is split into GEMMs
  of at most as many rows as a probe (``_max_rows``, once per shape and thread
  count) found to keep the 4-row kernel's bits. Attention rows are padded the same
  way, and attention reduces over the cache in whole chunks of ``KV_CHUNK``
  slots (masked slots add exact zeros), so its sums have the same shape for
  a token alone and in a block. Tested in ``tests/test_models.py``.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from . import kernels, prepared
from .base import CausalLM, KVCache, ModelInfo, causal_mask
from .kernels import KEY_BLOCK
from .argmax_head import ArgmaxHead
from .quant import (BF16PanelWeight, F32PanelWeight, Int4W4A8Weight, Int4Weight, Int8I15Weight, Int8PanelWeight,
                    Int8Weight, PackedBF16Weight, PanelWeight, can_pack_bf16, first_channels, linear, pack_bf16,
                    pack_bf16_panels, pack_f32, pack_int4_w4a8, pack_int4_w4a16, pack_int8_i15, pack_int8_panels,
                    quantize_int4, quantize_int8)
from ..errors import UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
#: an A16 int4 twin's head: each row's best logits recomputed with its target's head (NativeLlama._refine)
REFINE_TOP = 8
REFINE_MARGIN = 1.0     # ... of the logits within this of the row's max (the int8 head's error is ~0.01)
# weight format -> dtype of the activations fed to the projections
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16}
MIN_ROWS = 4            # GEMM rows below which MKL (float32) / oneDNN (bfloat16) take a GEMV kernel;
                        # threaded MKL splits rows in blocks of 4, so float32 rows are padded to a multiple
# A float32 / bfloat16 projection of a decode-sized call (up to SPLIT_ROWS rows) runs in row blocks no
# larger than what `_max_rows` found to keep the kernel of a 4-row call: BLAS libraries switch GEMM
# kernels at row counts that depend on the CPU, the shape and the thread count (MKL float32 on an Intel
# Xeon: 2-15 rows vs 16+ for K = 576, 2-5 vs 6+ for K = 128; oneDNN bfloat16: up to 32 vs 33+).
PROBE_ROWS = 32         # the largest row block tried
SPLIT_ROWS = 128        # calls with more rows run whole (no invariance needed; prefills run whole anyway)
ATTN_BLOCK = 1 << 22    # max score elements per attention matmul (long prompts go in query blocks)
KV_CHUNK = 256          # attention reduces over the cache in whole chunks of this many slots (position invariance)


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
    """Preallocated keys and values (layers, B, kv_heads, capacity, head_dim): float32, or
    bfloat16 for the compiled kernels of a model whose projections take bfloat16
    (``NativeLlama.kv_dtype``).

    Keys are stored transposed, (layers, B, kv_heads, head_dim, capacity), so that
    ``q @ K^T`` reads them as a plain strided matrix (about a quarter faster attention
    than a transposed view); ``blocked`` (the compiled kernels' layout): transposed per
    block of 16 slots, (layers, B, kv_heads, capacity / 16, head_dim, 16), so that the
    keys of a block are one contiguous tile instead of head_dim rows a capacity apart; a
    bfloat16 tile holds the dimensions in pairs, (..., capacity / 16, head_dim / 2, 16, 2)
    (AMX's layout for the second operand of a bfloat16 tile product; kernels' ``key_strides``).

    Allocated with ``torch.empty``: pages are only touched (and count towards
    resident memory) once tokens are written, so a large capacity is cheap
    until used. Slots below ``length`` are always written before being read.
    """

    def __init__(self, shape: LlamaShape, batch_size: int, capacity: int, dtype: torch.dtype = torch.float32,
                 blocked: bool = False):
        self.batch_size = batch_size
        self.capacity = capacity
        self.blocked = blocked
        slots = -(-capacity // KV_CHUNK) * KV_CHUNK      # storage for whole attention chunks
        L, Hkv, D = shape.layers, shape.kv_heads, shape.head_dim
        if not blocked:
            self.k = torch.empty(L, batch_size, Hkv, D, slots, dtype=dtype)
        elif dtype == torch.bfloat16:
            self.k = torch.empty(L, batch_size, Hkv, slots // KEY_BLOCK, D // 2, KEY_BLOCK, 2, dtype=dtype)
        else:
            self.k = torch.empty(L, batch_size, Hkv, slots // KEY_BLOCK, D, KEY_BLOCK, dtype=dtype)
        self.v = torch.empty(shape.layers, batch_size, shape.kv_heads, slots, shape.head_dim, dtype=dtype)
        self.finite = 0         # slots below this hold finite numbers (written, or zeroed once)
        self.valid = torch.ones(batch_size, capacity, dtype=torch.bool)  # False: padding slot
        self._length = 0
        self._all_valid = True  # fast path: no padding anywhere in the filled part

    @property
    def length(self) -> int:
        return self._length

    def keys(self, n: int) -> torch.Tensor:
        """The keys of the first n slots, (layers, B, kv_heads, head_dim, n), whatever the layout."""
        if not self.blocked:
            return self.k[..., :n]
        k = self._block_view()
        return k.reshape(*k.shape[:3], -1, k.shape[-2] * KEY_BLOCK)[..., :n]

    def _block_view(self) -> torch.Tensor:
        """The blocked keys as a view whose last two dimensions are the block and the column (slot s: block
        s // 16, column s % 16): (layers, B, kv_heads, head_dim, capacity / 16, 16), bfloat16 pairs
        (layers, B, kv_heads, head_dim / 2, 2, capacity / 16, 16)."""
        return self.k.permute(0, 1, 2, 4, 6, 3, 5) if self.k.dim() == 7 else self.k.transpose(3, 4)

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
            if self.blocked:          # slot s: block s // 16, column s % 16 of the tile
                k, dst = self._block_view(), torch.arange(start, start + n)
                k[..., dst // KEY_BLOCK, dst % KEY_BLOCK] = k[..., src // KEY_BLOCK, src % KEY_BLOCK]
            else:
                self.k[..., start:start + n] = self.k[..., src]
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

    config = hf_config.to_pretrained() if hasattr(hf_config, "to_pretrained") else hf_config   # CheckpointConfig
    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return inv.float(), float(scale)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # same arithmetic as transformers' LlamaRMSNorm (statistics in float32)
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def release_free_memory() -> None:
    """Hand memory that was freed back to the OS (glibc keeps it otherwise; resident size stays high)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):     # not glibc: nothing to do
        pass


def _chunked_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p @ v`` summed over fixed KV_CHUNK-slot chunks of the cache, in order.

    MKL's GEMM blocks its reduction in ways that depend on the total length;
    a fixed chunk length pins them. Slots a row may not see (p = 0, v finite)
    add exact zeros, so a row's result does not depend on how many chunks the
    call spans.
    """
    S = p.shape[-1]
    if S == KV_CHUNK:
        return torch.matmul(p, v)
    out = torch.matmul(p[..., :KV_CHUNK], v[..., :KV_CHUNK, :])
    for c in range(KV_CHUNK, S, KV_CHUNK):
        out += torch.matmul(p[..., c:c + KV_CHUNK], v[..., c:c + KV_CHUNK, :])
    return out


def _padded(rows: int) -> int:
    """Rows rounded up to a multiple of MIN_ROWS (see the module docstring)."""
    return -(-rows // MIN_ROWS) * MIN_ROWS


_MAX_ROWS: dict[tuple, int] = {}


def _max_rows(w: torch.Tensor, bias: torch.Tensor | None) -> int:
    """The largest multiple of MIN_ROWS (up to PROBE_ROWS) such that every call of MIN_ROWS, 2*MIN_ROWS,
    ... up to it rows through ``linear`` with ``w``'s shape, format and the current thread count gives
    each row the bits it gets in a MIN_ROWS-row call. Probed once per key on random data."""
    packed = isinstance(w, PackedBF16Weight)
    dtype = torch.bfloat16 if packed else w.dtype
    key = (torch.get_num_threads(), dtype, packed, tuple(w.shape), bias is not None)
    rows = _MAX_ROWS.get(key)
    if rows is None:
        g = torch.Generator().manual_seed(0)
        wr = torch.randn(w.shape, generator=g, dtype=dtype)          # no float32 copy of a large head
        wr = pack_bf16(wr) if packed else wr
        br = None if bias is None else torch.randn(bias.shape, generator=g).to(bias.dtype)
        x = torch.randn(PROBE_ROWS, w.shape[1], generator=g).to(dtype)
        ref = torch.cat([linear(x[r:r + MIN_ROWS], wr, br) for r in range(0, PROBE_ROWS, MIN_ROWS)])
        rows = MIN_ROWS
        while rows < PROBE_ROWS and torch.equal(linear(x[:rows + MIN_ROWS], wr, br), ref[:rows + MIN_ROWS]):
            rows += MIN_ROWS
        _MAX_ROWS[key] = rows
    return rows


def _split_rows(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x, w, bias)`` for a padded float32/bfloat16 call: over row blocks of at most
    ``_max_rows`` rows when ``x`` has more (up to SPLIT_ROWS), so that every row is computed by the
    GEMM kernel a single padded token uses."""
    R = x.shape[0]
    if R <= MIN_ROWS or R > SPLIT_ROWS:
        return linear(x, w, bias)
    chunk = _max_rows(w, bias)
    if R <= chunk:
        return linear(x, w, bias)
    return torch.cat([linear(x[r:r + chunk], w, bias) for r in range(0, R, chunk)])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class NativeLlama(CausalLM):
    """Llama / Mistral / Qwen2 decoder in plain PyTorch with a static cache."""

    def __init__(self, hf_config, weights: Mapping[str, torch.Tensor], *, dtype: str = "float32",
                 tokenizer=None, name: str = "model", invariant: bool = True, packed: bool | None = None,
                 attention: str = "auto", bf16_kernel: bool | None = None, int4_activations: int = 8):
        """``invariant=False`` drops the row padding of float32/bfloat16 products: a
        single-token step then uses the GEMV kernel (float32: ~1.5x faster per
        step on this machine) but its logits differ in the last bits from the
        same token's logits in a multi-token call, so greedy verification can
        disagree with plain decoding at near-exact ties (the compiled kernels' products need no padding).
        ``packed`` (bfloat16 through PyTorch only; default: whenever oneDNN runs bfloat16 natively here) keeps
        the projections in oneDNN's prepacked layout.
        ``attention``: ``"kernel"`` (the compiled kernels of :mod:`.kernels`: attention with every row's bits
        independent of its call, token trees included, the layer glue, and int4 x int8 products for the int4
        format), ``"torch"`` (PyTorch throughout: attention as matmuls over whole KV_CHUNK chunks, exact for
        chains only; int4 x bfloat16 products), or ``"auto"`` (the kernels where they can be built).
        ``bf16_kernel`` (bfloat16 with the kernels): the compiled bfloat16 products (``kernels/bf16.c``: AMX
        tiles where the CPU has them, else ``vdpbf16ps`` with AVX-512 BF16, else AVX2 + FMA or plain C) instead of
        PyTorch's (oneDNN's); default: wherever the kernels are built (``docs/engine.md``).
        ``int4_activations`` (int4 with the kernels): 8 (GGUF's Q8 blocks, the int4 format's products) or 16
        (the A16 variant, :class:`~.quant.Int4W4A16Weight`: float16 scales, activations in two int8 levels;
        quantspec's twin)."""
        arch = (getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"architecture {arch} is not supported by the native backend",
                            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}; use --backend transformers for others")
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}", f"choose one of {', '.join(DTYPES)}")
        if attention not in ("auto", "kernel", "torch"):
            raise UserError(f"unknown attention path {attention!r}", "choose auto, kernel or torch")
        if int4_activations not in (8, 16):
            raise UserError(f"int4_activations must be 8 or 16, got {int4_activations}", "use 8 or 16")
        self._attn_kernel = None if attention == "torch" else kernels.attention_kernel()
        self._glue = None if self._attn_kernel is None else kernels.layer_glue()
        if attention == "kernel" and self._attn_kernel is None:
            raise UserError(f"the attention kernel is unavailable: {kernels.FAILURE}", "use attention='torch'")
        # every node of a token tree gets the logits its path would get fed alone, bit for bit
        self.exact_tree_logits = self._attn_kernel is not None and invariant
        self.format = dtype
        self.dtype = DTYPES[dtype]          # activations fed to the projections
        # the int4 format's products with the kernels: W4A8, or the A16 variant (None: not int4 with the kernels)
        self.int4_activations = int4_activations if dtype == "int4" and self._attn_kernel is not None else None
        self.refine_top = 0        # > 0: each row's best logits recomputed from refine_head (see _refine)
        self.refine_head = None
        # The KV cache: with the kernels, bfloat16 where the projections take bfloat16 (their values come out
        # of a bfloat16 product already; the keys are rounded once, after RoPE): half the bytes a step's
        # attention reads. float32 for the float32 format and for PyTorch's attention path.
        self.kv_dtype = torch.bfloat16 if self._attn_kernel is not None and self.dtype == torch.bfloat16 \
            else torch.float32
        self.quantized = dtype in ("int8", "int4")
        self.invariant = invariant
        self.packed = can_pack_bf16() if packed is None else bool(packed and can_pack_bf16())
        # float32 with the kernels: the compiled float32 products (kernels/panels.c), invariant by construction
        self.panels = dtype == "float32" and self._attn_kernel is not None
        # bfloat16 with the kernels: the compiled bfloat16 products (kernels/bf16.c), invariant by construction
        if bf16_kernel and dtype == "bfloat16" and self._attn_kernel is None:
            raise UserError(f"the compiled bfloat16 products need the kernels, unavailable here: {kernels.FAILURE}",
                            "leave bf16_kernel unset (PyTorch's products are the fallback)")
        self._bf16_kernel = bf16_kernel                     # the choice asked for (twins inherit it)
        self.bf16_panels = dtype == "bfloat16" and self._attn_kernel is not None and bf16_kernel is not False
        self._pad_rows = invariant and not self.quantized and not self.panels and not self.bf16_panels  # MIN_ROWS
        self._probed_threads = 0                            # thread count the row-block probes ran for
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
        self._load_prepared(hf_config, weights)
        # with the kernels and compiled formats (int8, int4, float32): a forward's layers in one C call
        self._stack = (kernels.LayerStack.build(self.wqkv, self.wo, self.wgu, self.wdown, self.ln1, self.ln2,
                                                self.dtype)
                       if self._attn_kernel is not None and not self._pad_rows and not self.shape.qkv_bias else None)
        self.fused = self._stack is not None      # False: the same kernels called layer by layer from Python
        self._source = (hf_config, weights)   # what :meth:`twin` rebuilds from (LazyWeights: just an index)
        self._twins: dict[tuple[str, int], NativeLlama] = {}
        inv_freq, self.rope_scale = _rope_inv_freq(c)
        pos = torch.arange(max_ctx, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]                         # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)                          # (P, D)
        self.cos_table = emb.cos() * self.rope_scale                     # (P, D) float32
        self.sin_table = emb.sin() * self.rope_scale
        # rotate_half as one matmul: x @ rot_half == cat(-x2, x1) exactly (one ±1 per column)
        D, h = s.head_dim, s.head_dim // 2
        self.rot_half = torch.zeros(D, D)
        self.rot_half[torch.arange(h) + h, torch.arange(h)] = -1.0
        self.rot_half[torch.arange(h), torch.arange(h) + h] = 1.0
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
    _PREPARED = ("lm_head", "argmax_head", "argmax_rows", "embed", "norm", "wqkv", "bqkv", "wo", "wgu", "wdown",
                 "ln1", "ln2")    # what _load sets

    def _load_prepared(self, hf_config, weights: Mapping[str, torch.Tensor]) -> None:
        """:meth:`_load`, or what an earlier load of the same checkpoint in the same format left in the
        prepared-weights cache (:mod:`.prepared`); a checkpoint on disk is cached after its first load."""
        files = prepared.source_files(weights) if prepared.enabled() else None
        path = None
        if files is not None:
            options = {"format": self.format, "invariant": self.invariant, "packed": self.packed,
                       "panels": self.panels, "bf16_panels": self.bf16_panels, "kernels": self._attn_kernel is not None}
            if self.int4_activations == 16:      # (absent otherwise: the files cached before it keep their names)
                options["int4_activations"] = 16
            path = prepared.cache_file(files, hf_config.to_dict(), options)
            state = prepared.load(path)
            if state is not None and set(state) == set(self._PREPARED):
                self.__dict__.update(state)
                self.prepared_from = path
                return
        self._load(weights)
        self.prepared_from = None
        if path is not None:
            prepared.save(path, {a: getattr(self, a) for a in self._PREPARED}, files)

    def _load(self, w: Mapping[str, torch.Tensor]) -> None:
        """Convert each checkpoint tensor once; matrices become the chosen format."""
        s, dt = self.shape, self.dtype

        def raw(name: str) -> torch.Tensor:
            try:
                return w[name]
            except KeyError:
                raise UserError(f"weight {name} missing from the checkpoint",
                                "check that the model directory is a complete Llama-family checkpoint") from None

        def vec(name: str, dtype: torch.dtype = dt) -> torch.Tensor:    # norms and biases: small
            return raw(name).to(dtype).contiguous()

        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        for name, want in (("model.embed_tokens.weight", (s.vocab_size, s.hidden)),
                           ("model.layers.0.self_attn.q_proj.weight", (q, s.hidden)),
                           ("model.layers.0.self_attn.k_proj.weight", (kv, s.hidden)),
                           ("model.layers.0.self_attn.o_proj.weight", (s.hidden, q)),
                           ("model.layers.0.mlp.gate_proj.weight", (s.intermediate, s.hidden)),
                           ("model.layers.0.mlp.down_proj.weight", (s.hidden, s.intermediate))):
            got = tuple(w.shape(name)) if hasattr(w, "shape") else tuple(raw(name).shape)   # LazyWeights: no read
            if got != want:                             # config.json and the weights disagree
                raise UserError(f"weight {name} has the shape {got} where the model config says {want}",
                                "check that config.json belongs to these weights")

        # int4 with the compiled kernels: int4 x int8 products (models/kernels/int4.c), else PyTorch's int4 x bfloat16
        compiled = self._attn_kernel is not None

        def int4(m: torch.Tensor):
            if not compiled:
                return quantize_int4(m)
            if self.int4_activations == 16:
                try:
                    return pack_int4_w4a16(m)
                except ValueError:          # beyond float16's range: this matrix takes the W4A8 kernel
                    pass
            return pack_int4_w4a8(m)

        # the int8 format's matrices and the int4 format's LM head: int8 x 15-bit integer products
        # (kernels/int8.c) for layer widths that are multiples of 4
        widths = (s.hidden, s.heads * s.head_dim, s.intermediate)
        i15 = compiled and self.quantized and all(k % 4 == 0 for k in widths)

        def int8(m: torch.Tensor, head: bool = False) -> Int8Weight | Int8PanelWeight | Int8I15Weight:
            """With the kernels: through the int8 kernel (kernels/int8.c: activations as 15-bit integers,
            exact integer sums, AMX tiles for blocks of rows where the CPU has them), or the panel kernel
            (kernels/panels.c) for widths it does not take; float32 logits from a head. Without the
            kernels PyTorch's int8 x bfloat16 kernel."""
            q = quantize_int8(m)
            if not compiled:
                return q
            return pack_int8_i15(q, float_out=head) if i15 else pack_int8_panels(q, float_out=head)

        quantize = {"int8": int8, "int4": int4}.get(self.format)
        # oneDNN's prepacked layout (see quant.py)
        pack = self.format == "bfloat16" and self.packed and not self.bf16_panels

        def mat(*names: str, head: bool = False):      # a tensor or one of quant.py's weight classes
            m = torch.cat([raw(n) for n in names]) if len(names) > 1 else raw(names[0])
            if self.panels:
                return pack_f32(m)
            if self.bf16_panels:
                return pack_bf16_panels(m, float_out=head)
            if quantize is None:
                return pack_bf16(m) if pack else m.to(dt).contiguous()
            if self.format == "int4" and m.shape[1] % 32:
                raise UserError(f"int4 needs layer widths that are multiples of 32 (this model has {m.shape[1]})",
                                "use --dtype int8 or bfloat16 for this model")
            return quantize(m)

        head = "lm_head.weight" if "lm_head.weight" in w and not s.tie_embeddings else "model.embed_tokens.weight"
        # int4 keeps the LM head in int8 and the embedding in bfloat16 (GGUF files, too, keep them at
        # higher precision): an int4 head costs +7% perplexity on the default model, an int8 one +0.02%
        # and an int8 kernel reads it faster than bfloat16 for a single row; an embedding row is only
        # looked up, so bfloat16 costs memory, not time
        self.lm_head = int8(raw(head), head=True) if self.quantized else mat(head, head=True)   # (V, H)
        # greedy steps' LM head (argmax_head.py): an int8 copy and an error bound, then the exact logits of the
        # few tokens that can be the argmax; for the panel-layout heads of the float32 and bfloat16 kernels
        # (their bits per channel do not depend on the other channels of a call)
        self.argmax_head = (ArgmaxHead.build(self.lm_head)
                            if isinstance(self.lm_head, (F32PanelWeight, BF16PanelWeight)) and s.hidden % 4 == 0
                            else None)
        # the rows up to which it pays: the int8 kernel's 15-bit activations cost two integer dot products
        # per weight, so beyond a few rows the exact head's kernel is the faster one (Zen 4, 1 thread, after
        # 256 tokens: bfloat16 forwards 0.95x the time at 1 row, 1.01x at 2; float32 0.88x at 1-2 rows,
        # 0.90x at 4, 1.0x at 8)
        self.argmax_rows = 4 if self.panels else 1
        # (a prepacked head has no rows to look up: the embedding keeps a plain copy)
        self.embed = (raw("model.embed_tokens.weight").to(dt).contiguous() if self.format == "int4" or pack else
                      self.lm_head if head == "model.embed_tokens.weight" else
                      mat("model.embed_tokens.weight"))
        self.norm = vec("model.norm.weight", torch.float32)              # norms apply in float32
        self.wqkv, self.bqkv, self.wo, self.wgu, self.wdown, self.ln1, self.ln2 = ([] for _ in range(7))
        for i in range(s.layers):
            p = f"model.layers.{i}."
            self.wqkv.append(mat(*(p + f"self_attn.{n}_proj.weight" for n in "qkv")))
            self.bqkv.append(torch.cat([vec(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
                             if s.qkv_bias else None)
            self.wo.append(mat(p + "self_attn.o_proj.weight"))
            self.wgu.append(mat(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"))
            self.wdown.append(mat(p + "mlp.down_proj.weight"))
            self.ln1.append(vec(p + "input_layernorm.weight", torch.float32))
            self.ln2.append(vec(p + "post_attention_layernorm.weight", torch.float32))
            if self.quantized or pack or self.panels or self.bf16_panels:
                release_free_memory()   # quantizing or packing leaves freed temporaries in the heap

    def twin(self, dtype: str, int4_activations: int = 8) -> "NativeLlama":
        """The same checkpoint in another weight format (built once, then kept with this model).

        Used as a cheap draft of this model: the quantspec method drafts with
        the int4 twin and verifies with this model.
        """
        if dtype == self.format:
            return self
        key = (dtype, int4_activations if dtype == "int4" else 8)
        if key not in self._twins:
            config, weights = self._source
            self._twins[key] = NativeLlama(config, weights, dtype=dtype, tokenizer=self.tokenizer,
                                           name=self.info.name, invariant=self.invariant, packed=self.packed,
                                           bf16_kernel=self._bf16_kernel, int4_activations=key[1],
                                           attention="torch" if self._attn_kernel is None else "kernel")
            twin = self._twins[key]
            # the head's values: a tied head's are the twin's bfloat16 embedding (rows in a row: a few cache lines
            # each), else the target's head (a panel layout's row is spread over a cache line per pair)
            head = twin.embed if twin.shape.tie_embeddings and isinstance(twin.embed, torch.Tensor) else \
                self.lm_head if hasattr(self.lm_head, "rows") else None
            if twin.int4_activations == 16 and head is not None:
                twin.refine_head, twin.refine_top = head, REFINE_TOP
        return self._twins[key]

    def _probe_row_blocks(self) -> None:
        """Run :func:`_max_rows`'s probes for every projection shape now (~0.5 s for the default model
        in bfloat16), in the first call of a process (a prefill), rather than inside the first
        multi-token call: timed inside a drafted step, that one-time cost made the cost-aware back-off
        judge drafting too expensive and run the rest of the first request as plain steps."""
        for w, b in [(self.wqkv[0], self.bqkv[0]), (self.wo[0], None), (self.wgu[0], None),
                     (self.wdown[0], None), (self.lm_head, None)]:
            _max_rows(w, b)
        self._probed_threads = torch.get_num_threads()

    def weight_bytes(self, held: bool = False) -> int:
        """Bytes of weights one decode step reads (the embedding table only via the LM head);
        ``held=True``: every byte the weights occupy, a separate embedding table and greedy decoding's int8
        copy of the LM head (:attr:`argmax_head`) included."""
        ts = [self.lm_head, self.norm, *self.wqkv, *self.wo, *self.wgu, *self.wdown, *self.ln1, *self.ln2,
              *(b for b in self.bqkv if b is not None)]
        if held and self.embed is not self.lm_head:
            ts.append(self.embed)
        return sum(t.nbytes() if isinstance(t, (PackedBF16Weight, Int8Weight, Int4Weight, Int4W4A8Weight, PanelWeight,
                                                  Int8I15Weight))
                   else t.numel() * t.element_size()
                   for t in ts) + (self.argmax_head.nbytes() if held and self.argmax_head is not None else 0)

    def matrices(self, layers: Sequence[int] | None = None) -> list:
        """The projection matrices of a decode step, in order (for benchmarks)."""
        out = []
        for i in (self.layers_all if layers is None else layers):
            out += [self.wqkv[i], self.wo[i], self.wgu[i], self.wdown[i]]
        return out + [self.lm_head]

    # -- interface -----------------------------------------------------------
    def new_cache(self, batch_size: int = 1, capacity: int | None = None) -> StaticKVCache:
        cap = min(capacity or self.shape.max_context, self.shape.max_context)
        return StaticKVCache(self.shape, batch_size, cap, self.kv_dtype, blocked=self._attn_kernel is not None)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed, (Int8Weight, PanelWeight, Int8I15Weight)):
            return self.embed.rows(ids)                                  # (B, T, H) float32
        return F.embedding(ids, self.embed).float()

    @torch.inference_mode()
    def forward(self, cache, input_ids, positions=None, attn_mask=None, *, input_valid=None,
                logits_for=None, layers: Sequence[int] | None = None, vocab=None, greedy: bool = False):
        """See :mod:`paradecode.models.base`. ``layers`` runs only those layers (self-speculation);
        ``vocab`` (a :class:`~paradecode.drafters.vocab.DraftVocab` of this model) scores only its tokens,
        the others' logits -inf (a draft's cheaper LM head); ``greedy``: logits for a caller that reads only
        each row's argmax (:meth:`forward_greedy`)."""
        s = self.shape
        B, T = input_ids.shape
        L0 = cache.length
        if self._pad_rows and self._probed_threads != torch.get_num_threads():
            self._probe_row_blocks()
        S = L0 + T
        if S > cache.capacity:
            raise UserError(f"sequence of {S} tokens exceeds the context window of {cache.capacity}",
                            "shorten the prompt or lower --max-new-tokens")
        if positions is None:
            positions = self.default_positions(cache, T, B)
        cos = self.cos_table[positions].unsqueeze(2)                     # (B, T, 1, D)
        sin = self.sin_table[positions].unsqueeze(2)

        if input_valid is not None:
            cache.valid[:, L0:S] = input_valid
            cache._all_valid = cache._all_valid and bool(input_valid.all())
        else:
            cache.valid[:, L0:S] = True
        # A prompt into an empty cache is a prefill: every method, plain decoding included, encodes a prompt
        # with exactly this one call (methods/plain.py: prefill), so no other call has to reproduce its bits.
        # It runs whole: each projection in one GEMM over all its rows (a 112-token prompt: 4 row blocks
        # fewer). With the compiled kernels the rest is theirs, as in every other call (their attention
        # stops at the causal boundary: 0.65x the time of PyTorch's flash attention at 259 tokens; the
        # whole prefill ~0.8x the PyTorch path's); without them, causal flash attention over exactly the
        # prompt instead of scores over the padded chunk (~3.5x faster for a 259-token prompt).
        whole_prompt = B == 1 and L0 == 0 and T > 1 and attn_mask is None and cache._all_valid
        if self._attn_kernel is not None:
            return self._forward_kernel(cache, input_ids, cos, sin, attn_mask, input_valid, logits_for, layers,
                                        whole_prompt, vocab=vocab, greedy=greedy)
        if cache.blocked:
            raise ValueError("a cache in the kernels' blocked key layout: PyTorch's attention path takes transposed "
                             "keys (new_cache of this model)")
        bias = None if whole_prompt else self._mask_bias(cache, T, attn_mask, input_valid)  # (B, 1, 1, T, S)
        # Attention spans the cache rounded up to whole KV_CHUNK-slot chunks, the extra slots masked
        # (and finite: zeroed once), and p @ V sums the chunks in order: every product then has the
        # same shape whether a token comes alone or in a block, so its rounding does not depend on
        # the call size. (Over the exact length it did, once the cache passed ~250 tokens: a broken
        # greedy identity in bfloat16/int4. MKL's p @ V over 150 live slots gives other bits for
        # K = 192 than for K = 256, so no shorter alignment with a partial last chunk is safe.)
        Sa = -(-S // KV_CHUNK) * KV_CHUNK
        if Sa > cache.finite:
            cache.k[..., cache.finite:Sa] = 0.0
            cache.v[:, :, :, cache.finite:Sa] = 0.0
            cache.finite = Sa
        if Sa > S and not whole_prompt:
            if bias is None:
                bias = torch.zeros(B, 1, 1, T, S)
            bias = torch.cat([bias, bias.new_full((*bias.shape[:-1], Sa - S), float("-inf"))], dim=-1)

        Hq, Hkv, D, H = s.heads, s.kv_heads, s.head_dim, s.hidden
        G = Hq // Hkv
        M = G * T                                                        # query rows per kv head
        BT = B * T
        cdt = self.dtype
        Mp = _padded(M) if self.invariant else M
        qbuf = torch.zeros(B, Hkv, Mp, D)                                # zero rows pad the blocks
        qview = qbuf[:, :, :M].view(B, Hkv, G, T, D)
        scale = 1.0 / math.sqrt(D)
        small = Mp * Sa * B * Hkv <= ATTN_BLOCK
        if small and bias is not None:
            # one (B, 1, Mp, Sa) bias in the query rows' (G, T) order: a single add per layer
            bias = torch.cat([bias.expand(B, 1, G, T, Sa).reshape(B, 1, M, Sa),
                              bias.new_zeros(B, 1, Mp - M, Sa)], dim=2) if Mp > M else \
                bias.expand(B, 1, G, T, Sa).reshape(B, 1, M, Sa)
        # views taken once per call, not per layer
        k_new, v_new = cache.k[..., L0:S], cache.v[:, :, :, L0:S]        # (L, B, Hkv, D, T), (L, B, Hkv, T, D)
        k_att, v_att = cache.k[..., :Sa], cache.v[:, :, :, :Sa]          # (L, B, Hkv, D, Sa), (L, B, Hkv, Sa, D)
        # The residual stream and the attention output keep a multiple of MIN_ROWS rows when padding
        # (float32/bfloat16), so every projection sees the same GEMM kernels at no extra op.
        pad_rows = self._pad_rows and not whole_prompt
        R = _padded(BT) if pad_rows else BT
        x = self._embed(input_ids).view(BT, H)                           # (BT, H) float32
        if R > BT:
            x = torch.cat([x, x.new_zeros(R - BT, H)])                   # (R, H), rows >= BT are padding
        proj = _split_rows if pad_rows else linear                    # see _max_rows
        abuf = torch.zeros(R, Hq * D, dtype=cdt)                         # attention output, (R, Hq*D)
        aview = abuf[:BT].view(B, T, Hkv, G, D)

        for i in (self.layers_all if layers is None else layers):
            h = F.rms_norm(x, (H,), self.ln1[i], s.eps).to(cdt)          # (R, H)
            qkv = proj(h, self.wqkv[i], self.bqkv[i])
            qkv = (qkv[:BT] if R > BT else qkv).float().view(B, T, Hq + 2 * Hkv, D)
            qk = qkv[:, :, :Hq + Hkv]                                    # (B, T, Hq+Hkv, D)
            qk = torch.addcmul(qk * cos, qk @ self.rot_half, sin)        # RoPE on q and k at once
            k_new[i].copy_(qk[:, :, Hq:].permute(0, 2, 3, 1))            # (B, Hkv, D, T)
            v_new[i].copy_(qkv[:, :, Hq + Hkv:].transpose(1, 2))         # (B, Hkv, T, D)
            if whole_prompt:
                a = F.scaled_dot_product_attention(qk[:, :, :Hq].transpose(1, 2), qk[:, :, Hq:].transpose(1, 2),
                                                   qkv[:, :, Hq + Hkv:].transpose(1, 2), is_causal=True,
                                                   enable_gqa=True)             # (B, Hq, T, D), head h = kv * G + g
                abuf[:BT].view(B, T, Hq, D).copy_(a.transpose(1, 2))
            else:
                # (B, T, Hq, D) -> (B, Hkv, G, T, D): head h = kv * G + g
                torch.mul(qk[:, :, :Hq].view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4), scale, out=qview)
                if small:
                    scores = torch.matmul(qbuf, k_att[i])               # (B, Hkv, Mp, Sa)
                    if bias is not None:
                        scores.add_(bias)
                    a = _chunked_pv(scores.softmax(-1), v_att[i])        # (B, Hkv, Mp, D)
                else:
                    a = self._attend_blocked(qbuf, k_att[i], v_att[i], bias, M)
                aview.copy_(a[:, :, :M].view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4))  # (B, T, Hkv, G, D)
            x.add_(proj(abuf, self.wo[i]))
            h = F.rms_norm(x, (H,), self.ln2[i], s.eps).to(cdt)
            gate, up = proj(h, self.wgu[i]).chunk(2, dim=-1)           # (R, I) each
            x.add_(proj(F.silu(gate) * up, self.wdown[i]))
        cache._length = S
        return self._logits(x[:BT].view(B, T, H), logits_for, pad_rows, vocab, greedy)

    def _logits(self, x: torch.Tensor, logits_for, pad_rows: bool, vocab=None, greedy: bool = False) -> torch.Tensor:
        """Final norm and LM head for the rows of x (B, T, H) that ``logits_for`` asks for."""
        if logits_for is not None:
            x = x[:, logits_for]
        return self._head(F.rms_norm(x, (self.shape.hidden,), self.norm, self.shape.eps).to(self.dtype), None,
                          pad_rows, vocab, greedy)

    def _refine(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (R, V) from this model's head with each row's best (up to ``refine_top`` within
        ``REFINE_MARGIN`` of its max) recomputed from ``refine_head`` (a twin: its target's head, float32
        sums): the twin's argmax is then the target's but for float rounding, where its int8 head's flips
        near-ties. (Cheaper than a top-k: on the default model's 49,152 logits a top-8 alone took ~0.26 ms of
        a ~9 ms draft step.)"""
        R = logits.shape[0]
        best = logits.amax(-1, keepdim=True)                                         # (R, 1)
        near = (logits >= best - REFINE_MARGIN).sum(-1)                              # (R,) at least 1
        k = min(int(near.max()), self.refine_top, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices if k > 1 else logits.argmax(-1, keepdim=True)   # (R, k)
        w = self.refine_head
        flat = top.reshape(-1)
        rows = (w.index_select(0, flat) if isinstance(w, torch.Tensor) else w.rows(flat)).float().view(R, k, -1)
        exact = (rows * h[:R].float()[:, None, :]).sum(-1)                           # (R, k)
        return logits.scatter_(-1, top, exact)

    def head_prefix(self, n: int):
        """The LM head of the vocabulary's first ``n`` tokens (a view), or None where its layout has none."""
        return first_channels(self.lm_head, n)

    def forward_greedy(self, cache, input_ids, positions=None, attn_mask=None, *, input_valid=None,
                       logits_for=None):
        """See :meth:`CausalLM.forward_greedy`: with :attr:`argmax_head` (the float32 and bfloat16 formats
        with the compiled kernels) the exact logits only of the tokens that can be a row's argmax."""
        return self.forward(cache, input_ids, positions, attn_mask, input_valid=input_valid, logits_for=logits_for,
                            greedy=True)

    def _head(self, h: torch.Tensor, logits_for, pad_rows: bool, vocab=None, greedy: bool = False) -> torch.Tensor:
        """LM head for the rows of the final norm's output h (B, T, H) that ``logits_for`` asks for."""
        if logits_for is not None:
            h = h[:, logits_for]
        B2, T2, H = h.shape
        h = h.reshape(B2 * T2, H)
        if pad_rows and B2 * T2 % MIN_ROWS:
            h = torch.cat([h, h.new_zeros(_padded(B2 * T2) - B2 * T2, H)])
        proj = _split_rows if pad_rows else linear
        if self.refine_top:
            out = vocab.logits(h, proj) if vocab is not None else proj(h, self.lm_head).float()
            return self._refine(h, out[:B2 * T2, :self.vocab_size]).reshape(B2, T2, -1)
        if vocab is not None:
            return vocab.logits(h, proj)[:B2 * T2].view(B2, T2, -1)      # (B, T', V), -inf outside vocab
        if greedy and self.argmax_head is not None and B2 * T2 <= self.argmax_rows:
            return self.argmax_head.logits(h, self.lm_head).view(B2, T2, -1)   # (B, T', V): the argmax exact
        return proj(h, self.lm_head)[:B2 * T2].float().view(B2, T2, -1)  # (B, T', V)

    def _forward_kernel(self, cache, input_ids, cos, sin, attn_mask, input_valid, logits_for, layers,
                        whole_prompt: bool = False, vocab=None, greedy: bool = False):
        """A forward with the compiled kernels (:mod:`.kernels`): attention reads the cache over exactly the
        visible slots (no KV_CHUNK padding, no padded query rows), and what a layer does between its four
        projections is three calls of ``layer.c`` instead of ~25 PyTorch ops. ``whole_prompt``: a prefill,
        whose projections need no row blocks (see :meth:`forward`)."""
        s = self.shape
        B, T = input_ids.shape
        L0 = cache.length
        allow = self._allowed(cache, T, attn_mask, input_valid)            # (B, T, S) bool, or None
        Hq, Hkv, D, H = s.heads, s.kv_heads, s.head_dim, s.hidden
        BT = B * T
        cdt = self.dtype
        pad_rows = self._pad_rows
        R = _padded(BT) if pad_rows else BT
        x = self._embed(input_ids).view(BT, H)                           # (BT, H) float32: the residual stream
        proj = _split_rows if pad_rows and not whole_prompt else linear
        # the products' inputs have R rows; rows >= BT are zero padding, written once, skipped by the glue
        h = torch.zeros(R, H, dtype=cdt)                                 # a norm's output
        abuf = torch.zeros(R, Hq * D, dtype=cdt)                         # attention output
        mlp = torch.zeros(R, s.intermediate, dtype=cdt)                  # silu(gate) * up
        hv, mv = h[:BT], mlp[:BT]
        qk = torch.empty(BT, Hq + Hkv, D)                                # rotated queries and keys (scratch)
        att = abuf[:BT] if cdt == torch.float32 else torch.empty(BT, Hq * D)
        cos, sin = cos.reshape(BT, D), sin.reshape(BT, D)                # (BT, D) each
        glue, eps, G, scale = self._glue, s.eps, Hq // Hkv, 1.0 / math.sqrt(D)
        order = self.layers_all if layers is None else tuple(layers)
        if self.fused:      # the loop below in one call of stack.c
            self._stack.run(order, self.norm, x, hv, abuf[:BT], mv, qk, att, cos, sin, cache.k, cache.v, allow, B, T,
                            G, L0, scale, eps)
        else:
            norms = [self.ln1[i] for i in order[1:]] + [self.norm]       # the norm after each layer's MLP
            glue.add_rmsnorm(x, None, self.ln1[order[0]] if order else self.norm, eps, hv)
            for i, after in zip(order, norms):
                qkv = proj(h, self.wqkv[i], self.bqkv[i])                # (R, (Hq + 2 Hkv) D)
                glue.rope_attend(qkv, cos, sin, cache.k[i], cache.v[i], allow, qk, att, abuf, G, L0, scale)
                glue.add_rmsnorm(x, proj(abuf, self.wo[i]), self.ln2[i], eps, hv)
                glue.silu_mul(proj(h, self.wgu[i]), mv)
                glue.add_rmsnorm(x, proj(mlp, self.wdown[i]), after, eps, hv)
        cache._length = L0 + T
        return self._head(hv.view(B, T, H), logits_for, pad_rows, vocab, greedy)

    @staticmethod
    def _attend_blocked(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                        M: int) -> torch.Tensor:
        """Softmax attention of query rows q (B, Hkv, Mp, D) against keys kt (B, Hkv, D, S), values
        v (B, Hkv, S, D), in blocks of query rows (a long block's whole score matrix would be large).

        Rows beyond M are padding. ``bias`` (B, 1, 1, T, S) is 0 / -inf with rows
        ordered (G, T); rows are independent, so blocking changes nothing.
        """
        B, Hkv, Mp, D = q.shape
        S = kt.shape[3]
        if bias is None:
            return _chunked_pv(torch.matmul(q, kt).softmax(-1), v)
        T = bias.shape[3]
        G = M // T
        out = torch.empty(B, Hkv, G, T, D)
        # each product below has t rows (G is a batch dimension): keep t >= MIN_ROWS, the short tail
        # going with the block before it, so the kernel is the one a padded whole call uses
        step = max(MIN_ROWS, ATTN_BLOCK // (S * B * Hkv * G))
        qg = q[:, :, :M].view(B, Hkv, G, T, D)
        t0 = 0
        while t0 < T:
            t1 = T if T - t0 < step + MIN_ROWS else t0 + step
            sc = torch.matmul(qg[:, :, :, t0:t1], kt.unsqueeze(2))      # (B, Hkv, G, t, S)
            sc.add_(bias[..., t0:t1, :])
            out[:, :, :, t0:t1] = _chunked_pv(sc.softmax(-1), v.unsqueeze(2))
            t0 = t1
        return out.view(B, Hkv, M, D)

    @staticmethod
    def _mask_bias(cache: StaticKVCache, T: int, attn_mask, input_valid) -> torch.Tensor | None:
        """Additive mask (B, 1, 1, T, S): 0 where a new token may look, -inf elsewhere."""
        allowed = NativeLlama._allowed(cache, T, attn_mask, input_valid)
        if allowed is None:
            return None
        B, _, S = allowed.shape
        bias = torch.zeros(B, T, S).masked_fill_(~allowed, float("-inf"))
        return bias.view(B, 1, 1, T, S)

    @staticmethod
    def _allowed(cache: StaticKVCache, T: int, attn_mask, input_valid) -> torch.Tensor | None:
        """(B, T, S) bool: True where a new token may look; None when every token sees every slot."""
        L0 = cache.length
        if attn_mask is None and T == 1 and cache._all_valid and (input_valid is None or bool(input_valid.all())):
            return None  # one token seeing everything: no mask needed
        B = cache.batch_size
        new = causal_mask(T).expand(B, T, T) if attn_mask is None else attn_mask.expand(B, T, T)
        if input_valid is not None:
            # nobody attends to padding, but every token sees itself (keeps pad rows finite)
            new = (new & input_valid[:, None, :]) | torch.eye(T, dtype=torch.bool)
        old = cache.valid[:, None, :L0].expand(B, T, L0)
        return torch.cat([old, new], dim=-1)                             # (B, T, S)
