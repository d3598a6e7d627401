"""The prepared-weights cache (models/prepared.py): later loads read each format's packed weights back
instead of building them, and compute exactly what a fresh build computes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from paradecode.models import kernels, prepared
from paradecode.models.loading import LazyWeights, read_config
from paradecode.models.native import DTYPES, NativeLlama
from paradecode.models.tiny import tiny_hf_model

needs_kernels = pytest.mark.skipif(kernels.attention_kernel() is None,
                                   reason="no C compiler here: the kernels' formats are not built")


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A tiny Llama saved as safetensors (widths multiples of 32, so every format applies), and a cache
    directory of the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("PARADECODE_PREPARED_CACHE", raising=False)
    hf = tiny_hf_model("llama", vocab_size=97, hidden=64, intermediate=128, seed=3)
    hf.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def load(path, dtype, **kw) -> NativeLlama:
    return NativeLlama(read_config(path), LazyWeights(path), dtype=dtype, name="tiny", **kw)


def logits(model: NativeLlama) -> torch.Tensor:
    cache = model.new_cache(1, 64)
    first = model.forward(cache, torch.tensor([[1, 5, 9, 14, 3, 77, 40]]))
    return torch.cat([first, model.forward(cache, torch.tensor([[8]]))], dim=1)


def files(path) -> list[str]:
    d = prepared.directory()
    return sorted(p.name for p in d.glob("*.safetensors")) if d.is_dir() else []


@needs_kernels
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_second_load_reads_the_cache_and_computes_the_same_bits(checkpoint, dtype, monkeypatch):
    built = load(checkpoint, dtype)
    assert built.prepared_from is None and len(files(checkpoint)) == 1
    cached = load(checkpoint, dtype)
    assert cached.prepared_from is not None
    assert torch.equal(logits(built), logits(cached))
    monkeypatch.setenv("PARADECODE_PREPARED_CACHE", "0")
    assert torch.equal(logits(load(checkpoint, dtype)), logits(cached))
    for attr in NativeLlama._PREPARED:            # the same kinds of objects, not only the same logits
        a, b = getattr(built, attr), getattr(cached, attr)
        assert type(a) is type(b), attr
    if built.embed is built.lm_head:              # a tied head stays one object, not two copies
        assert cached.embed is cached.lm_head


@needs_kernels
def test_the_twin_of_a_cached_model_is_cached_too(checkpoint):
    first = load(checkpoint, "bfloat16").twin("int4")
    assert first.prepared_from is None
    again = load(checkpoint, "bfloat16").twin("int4")
    assert again.prepared_from is not None and torch.equal(logits(first), logits(again))


@needs_kernels
def test_the_a16_twin_is_cached_apart_from_the_w4a8_one(checkpoint):
    from paradecode.models.quant import Int4W4A16Weight

    a8 = load(checkpoint, "bfloat16").twin("int4")
    first = load(checkpoint, "bfloat16").twin("int4", int4_activations=16)
    assert first.prepared_from is None                 # not the W4A8 twin's file, cached just before
    again = load(checkpoint, "bfloat16").twin("int4", int4_activations=16)
    assert again.prepared_from is not None and isinstance(again.wqkv[0], Int4W4A16Weight)
    assert torch.equal(logits(first), logits(again)) and not torch.equal(logits(first), logits(a8))


def test_formats_options_and_checkpoints_get_files_of_their_own(checkpoint):
    load(checkpoint, "float32")
    load(checkpoint, "bfloat16")
    load(checkpoint, "float32", attention="torch")
    assert len(files(checkpoint)) == 3
    f = next(checkpoint.glob("*.safetensors"))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))     # the checkpoint changed: not its old weights
    assert load(checkpoint, "float32").prepared_from is None
    assert len(files(checkpoint)) == 4


def test_a_new_build_replaces_the_older_file_of_the_same_model(checkpoint, monkeypatch):
    load(checkpoint, "float32")
    (old,) = files(checkpoint)
    monkeypatch.setattr(prepared, "_code_hash", "another version of the code")
    assert load(checkpoint, "float32").prepared_from is None
    (new,) = files(checkpoint)
    assert new != old and new.split("-")[0] == old.split("-")[0]


def test_an_unreadable_file_is_rebuilt_not_fatal(checkpoint):
    want = logits(load(checkpoint, "float32"))
    (name,) = files(checkpoint)
    path = prepared.directory() / name
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])        # cut short
    rebuilt = load(checkpoint, "float32")
    assert rebuilt.prepared_from is None and torch.equal(logits(rebuilt), want)
    assert load(checkpoint, "float32").prepared_from is not None          # and written again, whole
    path.write_bytes(b"not a safetensors file")
    assert load(checkpoint, "float32").prepared_from is None


def test_in_memory_weights_and_a_disabled_cache_write_nothing(checkpoint, monkeypatch):
    hf = tiny_hf_model("llama", seed=4)
    NativeLlama(hf.config, hf.state_dict(), dtype="float32")
    assert files(checkpoint) == []
    monkeypatch.setenv("PARADECODE_PREPARED_CACHE", "0")
    assert load(checkpoint, "float32").prepared_from is None and files(checkpoint) == []


def test_what_the_format_cannot_hold_is_not_written(tmp_path):
    class Opaque:
        pass

    assert not prepared.save(tmp_path / "x.safetensors", {"w": Opaque()})
    assert not prepared.save(tmp_path / "y.safetensors", {"w": torch.ones(2).to_sparse()})
    assert list(tmp_path.iterdir()) == []
    assert prepared.save(tmp_path / "z.safetensors", {"w": [torch.ones(3), None], "n": 4, "v": torch.zeros(2)})
    back = prepared.load(tmp_path / "z.safetensors")
    assert back["n"] == 4 and back["w"][1] is None and torch.equal(back["w"][0], torch.ones(3))


def test_files_of_deleted_checkpoints_are_removed_on_the_next_write(checkpoint, tmp_path):
    other = tmp_path / "other"
    tiny_hf_model("llama", seed=5).save_pretrained(other)
    load(other, "float32")
    load(checkpoint, "float32")
    assert len(files(checkpoint)) == 2
    for f in other.iterdir():
        f.unlink()
    load(checkpoint, "bfloat16")                  # a write: the deleted checkpoint's file goes
    assert len(files(checkpoint)) == 2
    assert all(not json.loads(prepared._metadata(prepared.directory() / n)["sources"])[0].startswith(str(other))
               for n in files(checkpoint))


def test_a_new_conversion_of_a_gguf_removes_the_older_ones_of_the_same_path(tmp_path):
    from paradecode.models.loading import _drop_older_conversions

    def conversion(name, source):
        d = tmp_path / name
        d.mkdir()
        (d / "SOURCE").write_text(f"converted from {source}\n")
        return d

    old = conversion("model.Q4-aaaa", "/venv/model.Q4.gguf")
    elsewhere = conversion("model.Q4-bbbb", "/other/model.Q4.gguf")
    unrelated = conversion("another-cccc", "/venv/model.Q4.gguf")
    new = conversion("model.Q4-dddd", "/venv/model.Q4.gguf")
    _drop_older_conversions(new)
    assert not old.exists() and elsewhere.exists() and unrelated.exists() and new.exists()


def test_a_cache_that_cannot_be_written_still_loads(checkpoint):
    prepared.directory().parent.mkdir(parents=True, exist_ok=True)
    prepared.directory().write_text("a file where the directory should be")
    model = load(checkpoint, "float32")
    assert model.prepared_from is None and load(checkpoint, "float32").prepared_from is None
    assert torch.equal(logits(model), logits(load(checkpoint, "float32")))


def test_the_cache_keeps_within_its_size_dropping_the_least_recently_used(checkpoint, monkeypatch):
    def size(name):
        return (prepared.directory() / name).stat().st_size

    load(checkpoint, "float32")
    (f32,) = files(checkpoint)
    load(checkpoint, "bfloat16")
    (bf16,) = set(files(checkpoint)) - {f32}
    os.utime(prepared.directory() / f32, ns=(10**9, 10**9))             # float32 used long ago ...
    os.utime(prepared.directory() / bf16, ns=(2 * 10**9, 2 * 10**9))
    assert load(checkpoint, "float32").prepared_from is not None          # ... and now again: bfloat16 is the oldest
    monkeypatch.setenv("PARADECODE_PREPARED_CACHE_MB", str((size(f32) + size(bf16)) / 1e6))
    load(checkpoint, "int8")                                             # a write past the limit
    (i8,) = set(files(checkpoint)) - {f32, bf16}
    assert sorted(files(checkpoint)) == sorted([f32, i8])
    monkeypatch.setenv("PARADECODE_PREPARED_CACHE_MB", "0")
    load(checkpoint, "int4")                                             # what was just written stays
    assert len(files(checkpoint)) == 1 and files(checkpoint) != [f32] and files(checkpoint) != [i8]


def test_the_build_key_reads_the_code_that_decides_the_layouts():
    from pathlib import Path

    here = Path(prepared.__file__).parent
    assert all(list(here.glob(pattern)) for pattern in prepared._CODE)      # no pattern that matches nothing
    assert len(list(here.glob("kernels/*.c"))) >= 5
