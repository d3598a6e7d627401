"""Reference (plain) decoding: the oracle every lossless method is compared with.

Greedy is deterministic, sampling is reproducible from a seed, a batch of
prompts of different lengths gives each prompt its one-by-one output, and
generation stops at exactly the right token (EOS, stop string, budget).
``target_probs`` is the one place where temperature / top-k / top-p apply.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import paradecode.methods.plain as plain_mod
from paradecode.api import generate, generate_batch
from paradecode.errors import UserError
from paradecode.models.tiny import tiny_model
from paradecode.sampling import GenerationConfig, sample, target_probs

from prompts import PROMPTS
from test_speculative import VOCAB, chi2_pvalue, exact_marginals


def _tiny_prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 12, 1, 8)]


# -- greedy and sampling ---------------------------------------------------------
def test_greedy_is_deterministic(tiny):
    p = _tiny_prompts()[1]
    a = generate(tiny, p, max_new_tokens=20, ignore_eos=True)
    b = generate(tiny, p, max_new_tokens=20, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20


def test_greedy_is_argmax_of_full_recompute(tiny):
    """Every greedy token is the argmax of a from-scratch forward over prompt + output so far."""
    p = _tiny_prompts()[0]
    out = generate(tiny, p, max_new_tokens=10, ignore_eos=True).token_ids
    seq = torch.tensor([p + out])
    logits = tiny.forward(tiny.new_cache(1, 64), seq)[0]               # (n, V)
    assert logits[len(p) - 1:-1].argmax(-1).tolist() == out


def test_sampling_reproducible_and_seed_dependent(tiny):
    p = _tiny_prompts()[1]
    kw = dict(max_new_tokens=24, temperature=1.0, ignore_eos=True)
    a = generate(tiny, p, seed=1, **kw).token_ids
    b = generate(tiny, p, seed=1, **kw).token_ids
    c = generate(tiny, p, seed=2, **kw).token_ids
    assert a == b
    assert a != c


def test_default_greedy_deterministic(default_model):
    a = generate(default_model, "What is the capital of France?", chat=True, max_new_tokens=12)
    b = generate(default_model, "What is the capital of France?", chat=True, max_new_tokens=12)
    assert a.token_ids == b.token_ids
    assert "Paris" in a.text


# -- batches ---------------------------------------------------------------------
def test_batch_equals_one_by_one_tiny(tiny):
    prompts = _tiny_prompts()
    batch = generate_batch(tiny, prompts, max_new_tokens=12, ignore_eos=True)
    for p, r in zip(prompts, batch):
        assert r.token_ids == generate(tiny, p, max_new_tokens=12, ignore_eos=True).token_ids


def test_batch_equals_one_by_one_tiny_with_eos(tiny):
    """A row that stops early (EOS) must not disturb the others."""
    prompts = _tiny_prompts()
    solo = [generate(tiny, p, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts]
    eos = solo[0][3]                                                   # row 0 stops after 3 tokens
    batch = generate_batch(tiny, prompts, max_new_tokens=12, eos_token_ids=(eos,))
    for s, r in zip(solo, batch):
        cut = s.index(eos) if eos in s else len(s)
        assert r.token_ids == s[:cut]


def test_batch_equals_one_by_one_default(default_model):
    prompts = [PROMPTS[0], PROMPTS[5], PROMPTS[12]]                    # short, long, short
    batch = generate_batch(default_model, prompts, chat=True, max_new_tokens=16)
    for p, r in zip(prompts, batch):
        one = generate(default_model, p, chat=True, max_new_tokens=16)
        assert r.token_ids == one.token_ids
        assert r.finish_reason == one.finish_reason


# -- stopping ---------------------------------------------------------------------
def test_max_new_tokens(tiny):
    r = generate(tiny, _tiny_prompts()[2], max_new_tokens=7, ignore_eos=True)
    assert len(r.token_ids) == 7 and r.finish_reason == "length"


def test_eos_stops_before_the_eos_token(tiny):
    p = _tiny_prompts()[3]
    full = generate(tiny, p, max_new_tokens=16, ignore_eos=True).token_ids
    eos = full[5]
    r = generate(tiny, p, max_new_tokens=16, eos_token_ids=(eos,))
    assert r.token_ids == full[:full.index(eos)]
    assert r.finish_reason == "eos"
    assert r.stats.new_tokens == len(r.token_ids)


def test_stop_string(default_model):
    prompt = "List five fruits."
    full = generate(default_model, prompt, chat=True, max_new_tokens=40)
    text = full.text
    assert len(text) > 20
    stop = text[12:16]                                                 # cut in the middle of the answer
    cut = text.find(stop)
    r = generate(default_model, prompt, chat=True, max_new_tokens=40, stop=(stop,))
    assert r.finish_reason == "stop"
    # the tokens kept are the shortest prefix of the full output whose text reaches the stop string
    tok = default_model.tokenizer
    n = len(r.token_ids)
    assert r.token_ids == full.token_ids[:n]
    assert len(tok.decode(full.token_ids[:n])) > cut >= len(tok.decode(full.token_ids[:n - 1]))
    assert r.text == text[:cut]


def test_stop_string_is_not_streamed(default_model):
    """Streaming never shows a stop string, even one that spans several tokens."""
    prompt = "List five fruits."
    text = generate(default_model, prompt, chat=True, max_new_tokens=40).text
    stop = text[12:16]
    pieces: list[str] = []
    r = generate(default_model, prompt, chat=True, max_new_tokens=40, stop=(stop,), stream=pieces.append)
    assert "".join(pieces) == r.text == text[:text.find(stop)]


def test_default_model_eos(default_model):
    """A short chat answer ends with the model's own EOS, which is not in the output."""
    r = generate(default_model, "How are you today?", chat=True, max_new_tokens=120)  # ends after ~75
    assert r.finish_reason == "eos"
    assert not set(r.token_ids) & set(default_model.info.eos_token_ids)


# -- target_probs -----------------------------------------------------------------
logit_vectors = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=40)


@settings(max_examples=150, deadline=None)
@given(logit_vectors, st.floats(0.05, 1.0), st.floats(0.1, 3.0))
def test_top_p_keeps_minimal_nucleus(values, top_p, temp):
    logits = torch.tensor(values)
    cfg = GenerationConfig(temperature=temp, top_p=top_p)
    p = target_probs(logits, cfg)
    assert abs(float(p.sum()) - 1) < 1e-5
    base = (logits / temp).softmax(-1)
    kept = p > 0
    # the kept set carries at least top_p of the mass ...
    assert float(base[kept].sum()) >= top_p - 1e-5
    # ... every kept token is at least as likely as every dropped one ...
    if (~kept).any():
        assert float(base[kept].min()) >= float(base[~kept].max()) - 1e-7
        # ... and it is minimal: without its least likely member it would fall short
        # (ties at the boundary may keep or drop together)
        smallest = float(base[kept].min())
        assert float(base[kept].sum()) - smallest < top_p + 1e-5
    # kept tokens keep their relative odds
    ratio = p[kept] / base[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-3)


@settings(max_examples=100, deadline=None)
@given(logit_vectors, st.integers(1, 50))
def test_top_k_keeps_k_best(values, k):
    logits = torch.tensor(values)
    p = target_probs(logits, GenerationConfig(temperature=1.0, top_k=k))
    assert abs(float(p.sum()) - 1) < 1e-5
    kept = int((p > 0).sum())
    V = len(values)
    kth = torch.sort(logits, descending=True).values[min(k, V) - 1]
    assert kept == int((logits >= kth).sum())                          # k, plus ties at the k-th value
    if kept < V:
        assert float(logits[p > 0].min()) >= float(logits[p == 0].max())


@settings(max_examples=50, deadline=None)
@given(logit_vectors)
def test_temperature(values):
    logits = torch.tensor(values)
    t1 = target_probs(logits, GenerationConfig(temperature=1.0))
    assert torch.allclose(t1, logits.softmax(-1), atol=1e-6)
    cold = target_probs(logits, GenerationConfig(temperature=0.25))
    hot = target_probs(logits, GenerationConfig(temperature=4.0))
    # lower temperature concentrates mass on the argmax
    top = int(logits.argmax())
    assert float(cold[top]) >= float(t1[top]) - 1e-6 >= float(hot[top]) - 2e-6
    greedy = target_probs(logits, GenerationConfig(temperature=0.0))
    assert float(greedy.sum()) == 1.0 and int(greedy.argmax()) == top


def test_sampling_follows_target_probs(tiny):
    """Empirical first-token frequencies at temperature 1 match softmax of the logits."""
    p = _tiny_prompts()[1]
    logits = tiny.forward(tiny.new_cache(1, 32), torch.tensor([p]))[0, -1]
    probs = logits.softmax(-1)
    from paradecode.sampling import sample

    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = sample(probs.expand(n, -1), g)
    freq = torch.bincount(draws, minlength=probs.numel()).float() / n
    assert (freq - probs).abs().max() < 0.015


# -- plain sampling end to end: the oracle of every method's sampling test ------------------------
SAMPLED = dict(max_new_tokens=3, temperature=0.7, top_k=3, ignore_eos=True)
SAMPLED_PROMPT = [3, 7, 4, 9]
RUNS = 600


@pytest.fixture(scope="module")
def small():
    """A tiny model on a 12-token vocabulary: the exact distribution of 3 tokens is cheap to enumerate."""
    return tiny_model("llama", vocab_size=VOCAB, seed=3)


def _fit(counts: torch.Tensor, exact: torch.Tensor) -> float:
    """The chi-square p-value of ``counts`` against ``exact``; 0 when a token outside its support came out."""
    if counts[exact == 0].sum() > 0:
        return 0.0
    return chi2_pvalue(counts, exact)


def _plain_sampling_fits(model) -> tuple[float, float]:
    """p-values of (t1, t2) and (t2, t3) over RUNS seeded ``generate(.., "plain")`` runs."""
    c12, c23 = torch.zeros(VOCAB, VOCAB), torch.zeros(VOCAB, VOCAB)
    for s in range(RUNS):
        t = generate(model, SAMPLED_PROMPT, "plain", seed=s, **SAMPLED).token_ids
        c12[t[0], t[1]] += 1
        c23[t[1], t[2]] += 1
    e12, e23 = exact_marginals(model, SAMPLED_PROMPT, GenerationConfig(**SAMPLED))
    return _fit(c12, e12), _fit(c23, e23)


def test_plain_sampling_matches_the_exact_distribution(small):
    """Temperature 0.7 and top-k 3 apply to every token, not only the first (chi-square on pairs)."""
    assert min(_plain_sampling_fits(small)) > 1e-4


def test_plain_sampling_negative_control(small, monkeypatch):
    """Plain decoding that samples every token after the first at temperature 1 without top-k fails the test."""
    real, current = plain_mod.next_token, [None]

    def first_only(logits, gen, generator):
        if generator is not current[0]:                       # a new run: its first token stays right
            current[0] = generator
            return real(logits, gen, generator)
        return sample(logits.float().softmax(-1), generator)

    monkeypatch.setattr(plain_mod, "next_token", first_only)
    assert max(_plain_sampling_fits(small)) < 1e-6


def test_invalid_generation_settings():
    from paradecode.errors import UserError

    with pytest.raises(UserError):
        GenerationConfig(top_p=0.0)


@pytest.mark.parametrize("bad", [{"role": "user"}, 3.5, [1.5], [[1]], None, [True, 2], [1, {"role": "user"}]])
def test_prompt_of_the_wrong_kind_is_a_clear_error(tiny, bad):
    from paradecode.errors import UserError

    with pytest.raises(UserError, match="a prompt must be text, a list of chat messages or a list of token ids"):
        generate(tiny, bad, max_new_tokens=2)


def test_prompt_ids_as_tensor_or_array(tiny):
    import numpy as np

    ref = generate(tiny, [5, 6, 7], max_new_tokens=4).token_ids
    assert generate(tiny, torch.tensor([5, 6, 7]), max_new_tokens=4).token_ids == ref
    assert generate(tiny, np.array([5, 6, 7]), max_new_tokens=4).token_ids == ref


@pytest.mark.parametrize("messages, problem", [
    ([{"content": "hi"}], 'message 0 has no "role"'),
    ([{"role": "user"}], 'message 0 needs its "content" as text, got nothing'),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}], 'message 1 needs its "content" as text, got int'),
    ([{"role": "user", "content": ["a"]}], "got list"),
    ([{"role": "wizard", "content": "hi"}], "the role 'wizard', which this model's chat template does not know"),
])
def test_malformed_chat_messages_are_a_clear_error(default_model, messages, problem):
    """Not the template's UndefinedError or TypeError, and not a role the template would render as given."""
    from paradecode.errors import UserError

    with pytest.raises(UserError, match=re.escape(problem)):
        generate(default_model, messages, max_new_tokens=2)


def test_a_role_the_template_names_is_taken(default_model):
    """Roles beyond system/user/assistant/tool pass when the template spells them out."""
    from paradecode.api import _check_messages

    _check_messages([{"role": "ipython", "content": "{}"}], "{% if message['role'] == 'ipython' %}")
    with pytest.raises(Exception, match="ipython"):
        _check_messages([{"role": "ipython", "content": "{}"}], "{{ message['role'] }}")


def test_a_template_that_refuses_the_messages_is_a_clear_error(default_model):
    import copy
    import types

    from paradecode.api import encode_prompt
    from paradecode.errors import UserError

    tok = copy.copy(default_model.tokenizer)     # its compiled template is keyed by the source
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    model = types.SimpleNamespace(tokenizer=tok, vocab_size=default_model.vocab_size)
    with pytest.raises(UserError, match="chat template refused these messages: Conversation roles must alternate"):
        encode_prompt(model, [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("call, error", [
    (lambda m: generate("model", "hi"), TypeError),
    (lambda m: generate(m, "hi", options=["max_ngram=3"]), TypeError),
    (lambda m: generate(m, "hi", method=["pld"]), TypeError),
    (lambda m: generate(m, "hi", gen={"max_new_tokens": 2}), TypeError),
    (lambda m: generate(m, "hi", stream=True), TypeError),
    (lambda m: generate(m, "hi", cancel=True), TypeError),
    (lambda m: generate_batch(m, "hello"), TypeError),                     # would decode five 1-letter prompts
    (lambda m: generate(m, "hi", max_new_tokens=True), UserError),         # not 1
    (lambda m: generate(m, "hi", ignore_eos="no"), UserError),             # not True
    (lambda m: generate(m, "hi", stop=5), UserError),
    (lambda m: generate(m, "hi", eos_token_ids=5), UserError),
    (lambda m: generate(m, "hi", temperature=0.5, top_k=True), UserError),
    (lambda m: generate(m, [1, 2, 3], chat=True), UserError),              # chat applies to text
])
def test_the_python_api_refuses_wrong_kinds_up_front(tiny, call, error):
    with pytest.raises(error):
        call(tiny)


def test_numpy_integers_are_integers(tiny):
    import numpy as np

    from paradecode.methods import get_method

    assert get_method("pld", {"max_ngram": np.int64(3)}).config.max_ngram == 3

    assert len(generate(tiny, [1, 2, 3], max_new_tokens=np.int64(3), ignore_eos=True).token_ids) == 3
