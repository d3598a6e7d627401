"""Adapter for LLaDA-architecture checkpoints (GSAI-ML/LLaDA-8B-*) from a local directory.

LLaDA (Nie et al., 2025) is a Llama-like transformer without the causal mask:
pre-RMSNorm blocks, RoPE, SwiGLU feed-forward. Its Hugging Face modelling
(``modeling_llada.py``, OLMo-derived) names the weights

    model.transformer.wte.weight                       embedding (V, H)
    model.transformer.blocks.N.attn_norm.weight         RMSNorm before attention
    model.transformer.blocks.N.{q,k,v}_proj.weight      attention projections
    model.transformer.blocks.N.attn_out.weight          attention output projection
    model.transformer.blocks.N.ff_norm.weight           RMSNorm before the MLP
    model.transformer.blocks.N.ff_proj.weight           SwiGLU gate  (act(ff_proj(x)) * up_proj(x))
    model.transformer.blocks.N.up_proj.weight           SwiGLU up
    model.transformer.blocks.N.ff_out.weight            MLP down projection
    model.transformer.ln_f.weight                       final RMSNorm
    model.transformer.ff_out.weight                     output head (absent when weight_tying)

and its config uses ``d_model, n_heads, n_kv_heads, n_layers, mlp_hidden_size,
embedding_size/vocab_size, rope_theta, rms_norm_eps, mask_token_id`` (126336).
This module maps them onto :class:`~paradecode.diffusion.model.DiffusionTransformer`,
which computes the same function. No weights are ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ..errors import UserError
from .model import DiffusionShape, DiffusionTransformer

LLADA_MASK_ID = 126336


def llada_shape(cfg: Mapping, max_context: int | None = None) -> DiffusionShape:
    hidden, heads = int(cfg["d_model"]), int(cfg["n_heads"])
    vocab = int(cfg.get("embedding_size") or cfg["vocab_size"])
    return DiffusionShape(
        vocab_size=vocab, hidden=hidden, intermediate=int(cfg["mlp_hidden_size"]) if cfg.get("mlp_hidden_size")
        else int(cfg.get("mlp_ratio", 4) * hidden), layers=int(cfg["n_layers"]), heads=heads,
        kv_heads=int(cfg.get("n_kv_heads") or heads), head_dim=hidden // heads,
        eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=float(cfg.get("rope_theta", 10000.0)),
        max_context=int(max_context or cfg.get("max_sequence_length", 4096)),
        mask_id=int(cfg.get("mask_token_id", LLADA_MASK_ID)), eos_id=int(cfg.get("eos_token_id", 126081)),
        pad_id=int(cfg.get("pad_token_id", 126081)))


def llada_state_dict(cfg: Mapping, w: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaDA weight names → DiffusionTransformer parameter names (fusing q/k/v and gate/up)."""
    def get(name):
        try:
            return w[name].float()
        except KeyError:
            raise UserError(f"weight {name} missing from the LLaDA checkpoint",
                            "pass a complete LLaDA-architecture checkpoint directory") from None

    t = "model.transformer."
    out = {"embed": get(t + "wte.weight"), "norm": get(t + "ln_f.weight")}
    out["lm_head"] = out["embed"] if cfg.get("weight_tying") else get(t + "ff_out.weight")
    for i in range(int(cfg["n_layers"])):
        b = f"{t}blocks.{i}."
        out[f"wqkv.{i}"] = torch.cat([get(b + "q_proj.weight"), get(b + "k_proj.weight"), get(b + "v_proj.weight")])
        out[f"wo.{i}"] = get(b + "attn_out.weight")
        out[f"wgu.{i}"] = torch.cat([get(b + "ff_proj.weight"), get(b + "up_proj.weight")])
        out[f"wdown.{i}"] = get(b + "ff_out.weight")
        out[f"ln1.{i}"] = get(b + "attn_norm.weight")
        out[f"ln2.{i}"] = get(b + "ff_norm.weight")
    return out


def from_llada_weights(cfg: Mapping, weights: Mapping[str, torch.Tensor],
                       max_context: int | None = None) -> DiffusionTransformer:
    for key, want in (("include_bias", False), ("input_emb_norm", False), ("attention_layer_norm", False)):
        if bool(cfg.get(key, False)) != want:
            raise UserError(f"LLaDA config {key}={cfg.get(key)} is not supported",
                            "only the LLaDA-8B layout (no biases, no q/k norm) is supported")
    model = DiffusionTransformer(llada_shape(cfg, max_context))
    try:
        model.load_state_dict(llada_state_dict(cfg, weights))
    except RuntimeError as e:                        # a tensor's shape disagrees with config.json
        lines = [l.strip() for l in str(e).splitlines() if "size mismatch" in l] or [str(e).splitlines()[0]]
        raise UserError(f"the LLaDA weights do not match their config.json: {lines[0]}",
                        "pass a complete, unmodified LLaDA checkpoint directory", field="llada") from None
    return model.eval().requires_grad_(False)


LLADA_FIX = "pass a local LLaDA-architecture checkpoint directory (GSAI-ML/LLaDA-8B-*); other models " \
            "decode with `paradecode generate --model`"
REQUIRED_KEYS = ("d_model", "n_heads", "n_layers")


def load_llada(path: str | Path, max_context: int = 4096) -> DiffusionTransformer:
    """Load a LLaDA checkpoint directory (config.json + *.safetensors) into the native diffusion model."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    files = sorted(path.glob("*.safetensors"))
    if not cfg_file.is_file() or not files:
        raise UserError(f"{path} is not a LLaDA checkpoint directory",
                        "it needs config.json and *.safetensors (download it yourself; paradecode never does)")
    cfg = read_llada_config(cfg_file)
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as e:                       # noqa: BLE001  (SafetensorError, OSError, ...)
            raise UserError(f"cannot read {f}: not a whole safetensors file ({str(e).splitlines()[0]})",
                            LLADA_FIX, field="llada") from None
    return from_llada_weights(cfg, weights, max_context)


def read_llada_config(cfg_file: Path) -> dict:
    """A LLaDA config.json, checked to describe a LLaDA model (UserError naming the file otherwise)."""
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {cfg_file} as JSON ({e})", LLADA_FIX, field="llada") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_file} is not a JSON object", LLADA_FIX, field="llada")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        kind = f" (model_type {cfg['model_type']!r})" if "model_type" in cfg else ""
        raise UserError(f"{cfg_file.parent} is not a LLaDA checkpoint: its config.json has no {missing[0]!r}{kind}",
                        LLADA_FIX, field="llada")
    try:
        llada_shape(cfg)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{cfg_file} is not a valid LLaDA config ({type(e).__name__}: {e})", LLADA_FIX,
                        field="llada") from None
    return cfg
