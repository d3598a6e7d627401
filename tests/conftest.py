"""Shared fixtures: tiny random models (unit tests) and the default model (integration)."""

from __future__ import annotations

import pytest
import torch

from paradecode.models.tiny import tiny_model, tiny_pair

# The suite runs on 2 cores next to other work; keep runs deterministic.
torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct, native backend, float32 (the oracle's precision)."""
    from paradecode import load_model

    return load_model(dtype="float32")


@pytest.fixture(scope="session")
def tiny():
    """A tiny random-weight native Llama (vocab 97, 2 layers)."""
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_torch_attention():
    """``tiny``'s weights with PyTorch's attention: tree nodes off the leading chain get close, not
    bit-exact, logits, so the verifier falls back to its chain rule and the carry."""
    return tiny_model("llama", seed=0, attention="torch")


@pytest.fixture(scope="session")
def tiny_llama_pair():
    return tiny_pair("llama", seed=0)
