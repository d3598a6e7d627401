"""The sink's text as tokens arrive: incremental decoding, stop strings, streaming."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from paradecode.decoding.sink import LiveText, TokenSink
from paradecode.sampling import GenerationConfig

SAMPLE = ("Prompt lookup copies n-grams: «déjà vu», naïve café, 日本語のテキスト, emoji 😀🎉, "
          "code `x = f(y) + 1`\n\tand\u00a0spaces   here.")


@pytest.fixture(scope="module")
def smol_tokenizer():
    """The default model's tokenizer (byte-level BPE), without its weights."""
    from paradecode.models.loading import resolve_model_path
    from paradecode.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_path(None))


class _Tokenizers:
    """The sink's view of a bare ``tokenizers.Tokenizer``."""

    def __init__(self, backend):
        self.backend = backend

    def decode(self, ids):
        return self.backend.decode(list(ids), skip_special_tokens=True)


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A Llama-2-style tokenizer: ▁ for spaces, byte fallback, the first space stripped, a special token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {"<unk>": 0, "</s>": 1}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ("▁", "▁the", "▁cat", "s", "▁é", "t", "é", "▁日本", "語", "a", "▁"):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken("</s>", special=True)])
    return _Tokenizers(tok)


def _chunks(ids, sizes):
    i, k = 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        yield ids[i:i + n]
        i, k = i + n, k + 1


def _check_live_text(tokenizer, ids, sizes):
    live, seen, before = LiveText(tokenizer), [], ""
    assert live._stream is not None                     # the incremental path is the one under test
    for chunk in _chunks(ids, sizes):
        seen += chunk
        live.update(seen)
        full = tokenizer.decode(seen)
        if not full.startswith(before.rstrip("\ufffd")):
            # the tokenizer rewrote text it had already given: byte fallback turns a lone byte it showed
            # into U+FFFD once the next bytes prove the sequence invalid. No stream can follow that;
            # the sink's result is the full decode all the same.
            return
        before = full
        assert full.startswith(live.text)
        if not full.endswith("\ufffd"):
            assert live.text == full                    # only a character cut in half is held back


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), max_size=60), sizes=st.lists(st.integers(1, 7), min_size=1))
def test_live_text_is_the_full_decode_so_far_byte_level(smol_tokenizer, ids, sizes):
    _check_live_text(smol_tokenizer, ids, sizes)


@settings(max_examples=40, deadline=None)
@given(text=st.text(min_size=1, max_size=80), sizes=st.lists(st.integers(1, 5), min_size=1))
def test_live_text_on_encoded_text(smol_tokenizer, text, sizes):
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    _check_live_text(smol_tokenizer, ids, sizes)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), sizes=st.lists(st.integers(1, 7), min_size=1))
def test_live_text_is_the_full_decode_so_far_sentencepiece(sentencepiece_like, data, sizes):
    backend = sentencepiece_like.backend
    pieces = st.sampled_from([i for t, i in backend.get_vocab().items() if not t.startswith("<0x")])
    character = st.characters().map(lambda c: [backend.token_to_id(f"<0x{b:02X}>") for b in c.encode()])
    stray_byte = st.integers(0, 255).map(lambda b: [backend.token_to_id(f"<0x{b:02X}>")])
    units = data.draw(st.lists(st.one_of(pieces.map(lambda i: [i]), character, character, stray_byte),
                               max_size=30))
    _check_live_text(sentencepiece_like, [i for u in units for i in u], sizes)


def test_a_stream_the_decoder_cannot_follow_falls_back_to_full_decodes(sentencepiece_like):
    """Byte fallback shows a lone byte, then rewrites it once the next bytes prove it invalid: the incremental
    decoder refuses that step, and the text goes on as full decodes (found by hypothesis above)."""
    live, seen = LiveText(sentencepiece_like), []
    for i in (50, 130, 263):                 # two stray bytes, then a piece
        seen.append(i)
        stands = live.update(seen)
        assert live.text == sentencepiece_like.decode(seen) or live._stream is not None
    assert live._stream is None and live.text == sentencepiece_like.decode(seen)
    assert stands < len(sentencepiece_like.decode(seen[:2]))     # the rewritten text is not claimed to stand


def test_a_tokenizer_without_a_backend_decodes_in_full():
    class Plain:
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    live = LiveText(Plain())
    live.update([0, 1])
    live.update([0, 1, 2])
    assert live.text == "abc"


def _reference_stop(tokenizer, ids, sizes, stops):
    """What a sink must do, decoding everything at every emit: stop at the first emit whose text holds a
    stop string, keep the shortest token prefix whose text reaches it, and end the text before it."""
    seen = []
    for chunk in _chunks(ids, sizes):
        seen += chunk
        text = tokenizer.decode(seen)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            cut = min(hits)
            n = next(n for n in range(1, len(seen) + 1) if len(tokenizer.decode(seen[:n])) > cut)
            return seen[:n], text[:cut], "stop"
    return ids, tokenizer.decode(ids), None


@settings(max_examples=80, deadline=None)
@given(data=st.data(), sizes=st.lists(st.integers(1, 6), min_size=1))
def test_stop_strings_and_streaming_over_any_emits(smol_tokenizer, data, sizes):
    """A stop string is found wherever it falls, across emits too, and never streamed."""
    ids = smol_tokenizer.encode(SAMPLE, add_special_tokens=False)
    text = smol_tokenizer.decode(ids)
    stops = []
    for _ in range(data.draw(st.integers(1, 3))):
        start = data.draw(st.integers(0, len(text) - 1))
        stops.append(text[start:start + data.draw(st.integers(1, 6))])
    if data.draw(st.booleans()):
        stops.append("never in the text")
    pieces: list[str] = []
    sink = TokenSink(gen=GenerationConfig(max_new_tokens=len(ids), stop=tuple(stops)), eos_token_ids=(),
                     tokenizer=smol_tokenizer, on_text=pieces.append)
    for chunk in _chunks(ids, sizes):
        if sink.emit(chunk):
            break
    kept, want_text, reason = _reference_stop(smol_tokenizer, ids, sizes, stops)
    assert sink.tokens == kept
    result = sink.result([])
    assert result.text == want_text
    assert result.finish_reason == (reason or "length")
    assert "".join(pieces) == want_text


def test_streaming_without_stop_strings_is_the_text(smol_tokenizer):
    ids = smol_tokenizer.encode(SAMPLE, add_special_tokens=False)
    pieces: list[str] = []
    sink = TokenSink(gen=GenerationConfig(max_new_tokens=len(ids)), eos_token_ids=(), tokenizer=smol_tokenizer,
                     on_text=pieces.append)
    for chunk in _chunks(ids, [1, 3, 2]):
        sink.emit(chunk)
    assert sink.done and "".join(pieces) == sink.result([]).text == SAMPLE
    assert all(pieces) and not any(p.endswith("\ufffd") for p in pieces)

