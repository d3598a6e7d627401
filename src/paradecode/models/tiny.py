"""Tiny random-weight models built in-process (tests, examples; no downloads).

``tiny_pair`` returns the same weights twice: as a transformers model and as
paradecode's native model, so the two can be compared logit for logit.
"""

from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2", "mistral")


def tiny_hf_model(arch: str = "llama", *, vocab_size: int = 97, hidden: int = 64, layers: int = 2,
                  heads: int = 4, kv_heads: int = 2, intermediate: int = 128, max_context: int = 256,
                  seed: int = 0, rope_scaling: dict | None = None, tie: bool = False):
    """A random-weight transformers causal LM of the given family."""
    import transformers as tf

    cls_cfg, cls_model = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[arch]
    kw = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_context,
              tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "mistral":
        kw["sliding_window"] = None
    if rope_scaling is not None:
        kw["rope_parameters"] = {"rope_theta": 10000.0, **rope_scaling}
    config = cls_cfg(**kw)
    config.architectures = [cls_model.__name__]
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    with torch.no_grad():  # larger random weights give peaked, varied distributions
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15 if "embed" in name or "lm_head" in name else 0.08)
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    return model


def tiny_native(hf_model, dtype: str = "float32", **kw):
    from .native import NativeLlama

    return NativeLlama(hf_model.config, hf_model.state_dict(), dtype=dtype, name="tiny", **kw)


def tiny_pair(arch: str = "llama", **kw):
    """(transformers adapter, native model) with identical random weights."""
    from .hf import HFCausalLM

    hf = tiny_hf_model(arch, **kw)
    return HFCausalLM(hf, None, name="tiny"), tiny_native(hf)


def tiny_model(arch: str = "llama", dtype: str = "float32", attention: str = "auto", **kw):
    """A native tiny model (no tokenizer: work on token ids)."""
    return tiny_native(tiny_hf_model(arch, **kw), dtype, attention=attention)
