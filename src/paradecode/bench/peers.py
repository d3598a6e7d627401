"""Other implementations measured in the same run, on the same prompts and token budget.

A peer takes prompt token ids and returns the generated ids (EOS excluded)
and the wall time. Every peer is optional: :meth:`Peer.setup` returns a note
saying why it is skipped (not installed, needs a GGUF file, needs a draft
model) and the benchmark prints that note instead of failing.

* ``transformers``: ``model.generate`` greedy on the same weights;
* ``transformers-pld``: the same with ``prompt_lookup_num_tokens``;
* ``transformers-assisted``: the same with ``assistant_model`` (``--draft-model``);
* ``llama.cpp``: ``llama-cpp-python`` on the GGUF file, greedy (top-k 1).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class PeerContext:
    """What peers need to know about the model under test."""

    model_spec: str | None                 # what the user passed to --model (None: the default model)
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    threads: int | None = None
    draft_model: str | None = None
    hf_model: Any = None                   # a loaded transformers model (tests); else loaded lazily
    prompt_lookup_tokens: int = 10
    _draft_hf: Any = field(default=None, repr=False)

    def hf_path(self) -> Path | None:
        from ..models.loading import resolve_model_path

        return resolve_model_path(self.model_spec)

    def gguf_path(self) -> Path | None:
        from ..models.loading import default_gguf

        if self.model_spec in (None, "default"):
            return default_gguf()
        p = Path(self.model_spec)
        return p if p.suffix == ".gguf" and p.is_file() else None

    def transformers_model(self):
        if self.hf_model is None:
            self.hf_model = _load_hf(self.hf_path())
        return self.hf_model

    def draft_hf(self):
        if self._draft_hf is None and self.draft_model:
            from ..models.loading import resolve_model_path

            self._draft_hf = _load_hf(resolve_model_path(self.draft_model))
        return self._draft_hf


def _load_hf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


class Peer:
    name: ClassVar[str]
    summary: ClassVar[str]

    def __init__(self, ctx: PeerContext):
        self.ctx = ctx

    def setup(self) -> str | None:
        """Prepare; return None when ready or a one-line note why this peer is skipped."""
        return None

    def generate(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], float, float | None]:
        """Greedy continuation of ``ids``: (tokens, wall seconds, seconds until the first token or None
        when the peer does not expose it)."""
        raise NotImplementedError


def _cut_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def _first_token_clock():
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenClock(BaseStreamer):
        """Notes when ``generate`` hands over its first new token (its first ``put`` is the prompt)."""

        def __init__(self):
            self.puts = 0
            self.at: float | None = None

        def put(self, value) -> None:
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    return FirstTokenClock()



class TransformersGreedy(Peer):
    name = "transformers"
    summary = "transformers model.generate, greedy"

    def setup(self) -> str | None:
        if importlib.util.find_spec("transformers") is None:
            return "transformers is not installed"
        self.model = self.ctx.transformers_model()
        return None

    def extra_config(self) -> dict[str, Any]:
        """Extra ``GenerationConfig`` fields of this peer."""
        return {}

    def extra_kwargs(self) -> dict[str, Any]:
        """Extra ``generate`` arguments that are not config fields (models)."""
        return {}

    def generate(self, ids, max_new_tokens):
        import torch
        from transformers import GenerationConfig

        cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                               eos_token_id=list(self.ctx.eos_token_ids), pad_token_id=self.ctx.pad_token_id,
                               **self.extra_config())
        x = torch.tensor([ids])
        clock = _first_token_clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg,
                                      streamer=clock, **self.extra_kwargs())
        wall = time.perf_counter() - t0
        first = None if clock.at is None else clock.at - t0
        return _cut_eos(out[0, len(ids):].tolist(), self.ctx.eos_token_ids), wall, first


class TransformersPromptLookup(TransformersGreedy):
    name = "transformers-pld"
    summary = "transformers model.generate with prompt_lookup_num_tokens (prompt lookup decoding)"

    def extra_config(self):
        return {"prompt_lookup_num_tokens": self.ctx.prompt_lookup_tokens}


class TransformersAssisted(TransformersGreedy):
    name = "transformers-assisted"
    summary = "transformers model.generate with assistant_model (speculative decoding with a draft model)"

    def setup(self):
        if not self.ctx.draft_model:
            return "no draft model given (pass --draft-model PATH to include assisted generation)"
        note = super().setup()
        self.assistant = self.ctx.draft_hf()
        return note

    def extra_kwargs(self):
        return {"assistant_model": self.assistant}


def open_llama(gguf: Path, threads: int, **kwargs):
    """A quiet llama-cpp-python model on ``gguf`` that uses ``threads`` threads for prompts and steps alike."""
    from llama_cpp import Llama

    # n_threads_batch (prompt processing) defaults to every core: pin it too, or prefill is not 1-thread
    return Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, verbose=False,
                 **{"n_ctx": 4096, **kwargs})


def llama_greedy(llm, ids: list[int], max_new_tokens: int, eos: Collection[int] = (),
                 first_token_at: list[float] | None = None) -> list[int]:
    """Greedy (top-k 1, no penalties) continuation of ``ids``, stopping before a token in ``eos``.

    The whole prompt is evaluated every time: ``reset`` stops ``generate`` from reusing a cached prefix.
    ``first_token_at`` receives the ``perf_counter`` time at which the first token came out.
    """
    out: list[int] = []
    llm.reset()
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if first_token_at is not None and not first_token_at:
            first_token_at.append(time.perf_counter())
        if tok in eos:
            break
        out.append(int(tok))
        if len(out) >= max_new_tokens:
            break
    return out


# A build of llama-cpp-python can crash the process inside a CPU kernel (a wheel compiled on a
# machine with AMX segfaulted in ggml_backend_amx_mul_mat here). A crash cannot be caught, so
# two tokens are decoded in a child process first and the peer is skipped if that child dies.
_SMOKE = """
import sys
from paradecode.bench.peers import open_llama, llama_greedy
llama_greedy(open_llama(sys.argv[1], 1, n_ctx=64), [1, 2, 3], 2)
"""
LLAMA_REBUILD = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_INT8=OFF" '
                 "pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python")


def smoke_test_llama(gguf: Path, timeout: float = 120.0) -> str | None:
    """None if llama.cpp decodes ``gguf`` in a child process, else a note saying how it failed."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", _SMOKE, str(gguf)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"llama.cpp did not decode 2 tokens within {timeout:.0f} s in a smoke test"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return (f"llama.cpp crashed in a smoke test (signal {-done.returncode}); this build does not run "
                f"on this CPU: rebuild it without AMX, e.g. {LLAMA_REBUILD}")
    last = (done.stderr.strip().splitlines() or ["no error output"])[-1]
    return f"llama.cpp failed in a smoke test: {last}"


class LlamaCpp(Peer):
    name = "llama.cpp"
    summary = "llama-cpp-python on the same GGUF file, greedy (top-k 1)"

    def setup(self):
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed (pip install 'paradecode[llamacpp]', compiles ~10 min)"
        gguf = self.ctx.gguf_path()
        if gguf is None:
            return "llama.cpp needs a GGUF file (the default model or a --model path ending in .gguf)"
        crash = smoke_test_llama(gguf)
        if crash is not None:
            return crash
        import torch

        self.llm = open_llama(gguf, self.ctx.threads or torch.get_num_threads())
        self.eos = set(self.ctx.eos_token_ids) | {self.llm.token_eos()}
        return None

    def generate(self, ids, max_new_tokens):
        first: list[float] = []
        t0 = time.perf_counter()
        out = llama_greedy(self.llm, ids, max_new_tokens, self.eos, first_token_at=first)
        return out, time.perf_counter() - t0, (first[0] - t0 if first else None)


PEERS: dict[str, type[Peer]] = {p.name: p for p in (TransformersGreedy, TransformersPromptLookup,
                                                     TransformersAssisted, LlamaCpp)}
