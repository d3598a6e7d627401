"""Model backends behind one interface (see :mod:`paradecode.models.base`)."""

from .base import CausalLM, KVCache, ModelInfo, causal_mask
from .loading import BACKENDS, load_model, resolve_model_path

__all__ = ["CausalLM", "KVCache", "ModelInfo", "causal_mask", "load_model", "resolve_model_path", "BACKENDS"]
