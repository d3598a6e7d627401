"""The ``draft`` method: a separate draft model with its own KV cache.

Greedy output must equal plain greedy token for token; a draft with the
target's own weights must be accepted 100% (a stale or badly rolled-back
draft cache would break that); sampled output must follow the target's exact
distribution (chi-square against an enumerated distribution on a tiny model),
and dropping the draft's q must be caught by the same test.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from paradecode.api import generate
from paradecode.decoding.sink import TokenSink
from paradecode.decoding.tree import Draft
from paradecode.decoding.verify import Verdict
from paradecode.drafters.chain import ChainDrafter, common_prefix, draft_seed, next_draft_length
from paradecode.errors import UserError
from paradecode.methods.base import get_method
from paradecode.methods.draft import ModelDrafter
from paradecode.models.tiny import tiny_hf_model, tiny_model, tiny_native
from paradecode.sampling import GenerationConfig, target_probs
from paradecode.stats import DecodeStats

from prompts import PROMPTS
from test_speculative import accepted_draft_tokens


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=0, layers=2)


@pytest.fixture(scope="module")
def twin():
    """Same weights as ``target``, a separate instance (its own cache, its own calls)."""
    return tiny_model("llama", seed=0, layers=2)


@pytest.fixture(scope="module")
def small():
    """A different, 1-layer model on the same 97-token vocabulary."""
    return tiny_model("llama", seed=1, layers=1)


@pytest.fixture(scope="module")
def noisy():
    """``target``'s weights plus noise (std 0.03 on weights of std 0.08..0.15): a draft that agrees with the
    target about a quarter of the time, so verification both accepts and rejects (``small`` almost never
    agrees)."""
    hf = tiny_hf_model("llama", seed=0, layers=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.03)
    return tiny_native(hf)


def _prompt(n: int, seed: int = 0, vocab: int = 97) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _plain(model, prompt, n, **kw):
    return generate(model, prompt, "plain", max_new_tokens=n, ignore_eos=True, **kw)


# -- pure pieces ----------------------------------------------------------------------------------
def test_heuristic_schedule():
    assert next_draft_length(4, 4, 4, 1, 12, "heuristic") == 6           # all accepted: +2
    assert next_draft_length(4, 4, 3, 1, 12, "heuristic") == 3           # otherwise: -1
    assert next_draft_length(1, 4, 0, 1, 12, "heuristic") == 1           # clamped below
    assert next_draft_length(12, 3, 3, 1, 12, "heuristic") == 12         # clamped above
    assert next_draft_length(4, 4, 0, 1, 12, "constant") == 4
    assert next_draft_length(4, 0, 0, 1, 12, "heuristic") == 4           # no draft: no evidence


def test_common_prefix_and_seed():
    assert common_prefix([], [1]) == 0 and common_prefix([1, 2], [1, 2]) == 2 and common_prefix([1, 3], [1, 2]) == 1
    assert draft_seed(None) is None and draft_seed(5) != 5 and draft_seed(5) == draft_seed(5)


# -- the draft cache follows the context ------------------------------------------------------------
def test_draft_cache_mirrors_context_through_accepts_and_rejects(target, twin):
    """After every proposal the draft cache holds exactly context + all draft tokens but the last."""
    method = get_method("draft", {"draft_model": twin, "confidence_threshold": 0.0, "schedule": "constant",
                                  "num_draft_tokens": 3})
    d = ModelDrafter(method.config, twin)
    stats = DecodeStats()
    d.begin(target, _prompt(7), GenerationConfig(max_new_tokens=50), stats)
    context = _prompt(7) + [5]
    for accept in (3, 0, 1, 2, 3, 0):
        draft = d.propose(context, 8)
        assert len(draft) == 3
        assert d.cached == context + draft.tokens[:-1] and d.cache.length == len(d.cached)
        tokens = draft.tokens[:accept] + [11 + accept]                    # a recovered/bonus token
        verdict = Verdict(list(range(accept)), tokens, draft=draft)
        context = context + tokens
        d.observe(context, verdict, torch.zeros(len(draft) + 1, 97))
    # the cache content equals a from-scratch encoding of what it claims to hold
    torch.testing.assert_close(twin.forward(d.cache, torch.tensor([[context[-1]]]))[0, -1],
                               twin.forward(twin.new_cache(1, 64), torch.tensor([d.cached + [context[-1]]]))[0, -1],
                               atol=1e-4, rtol=1e-4)


def test_confidence_threshold_stops_drafting(target, small):
    options = {"draft_model": small, "confidence_threshold": 0.99, "backoff": False}
    r = generate(target, _prompt(6), "draft", options, max_new_tokens=20, ignore_eos=True)
    assert set(r.stats.extra["draft_lengths"]) == {1}                    # tiny models are never that sure


# -- greedy: identical to plain ---------------------------------------------------------------------
def test_same_weights_draft_is_always_accepted(target, twin):
    """A twin draft must agree everywhere: any cache bookkeeping slip shows up as a rejection."""
    p = _prompt(9)
    ref = _plain(target, p, 60)
    r = generate(target, p, "draft", {"draft_model": twin, "confidence_threshold": 0.0, "backoff": False},
                 max_new_tokens=60,
                 ignore_eos=True)
    assert r.token_ids == ref.token_ids
    assert r.stats.acceptance_rate == 1.0
    assert r.stats.tokens_per_call > 3                                    # k grew: 4, 6, 8, ...
    assert max(r.stats.extra["draft_lengths"]) > 4
    assert r.stats.draft_calls > 0 and r.stats.draft_tokens > 0


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 20), seed=st.integers(0, 1000), k=st.integers(1, 6),
       schedule=st.sampled_from(["heuristic", "constant"]), conf=st.sampled_from([0.0, 0.05, 0.3]),
       budget=st.integers(1, 40), siblings=st.integers(0, 3))
def test_greedy_matches_plain(target, noisy, n, seed, k, schedule, conf, budget, siblings):
    p = _prompt(n, seed)
    ref = _plain(target, p, budget)
    r = generate(target, p, "draft", {"draft_model": noisy, "num_draft_tokens": k, "max_draft_tokens": max(k, 8),
                                      "schedule": schedule, "confidence_threshold": conf, "siblings": siblings,
                                      "backoff": False},
                 max_new_tokens=budget, ignore_eos=True)
    assert r.token_ids == ref.token_ids


def test_a_partly_agreeing_draft_is_accepted_and_rejected(target, noisy):
    """The companion of the property test above: on fixed prompts the noisy draft's tokens are accepted
    (45 of 173 drafted) and rejected, so both the kept and the rolled-back draft cache are exercised."""
    accepted = drafted = 0
    for seed in range(12):
        p = _prompt(1 + seed, seed)
        ref = _plain(target, p, 20)
        r = generate(target, p, "draft", {"draft_model": noisy, "num_draft_tokens": 3, "backoff": False,
                                          "schedule": ["constant", "heuristic"][seed % 2]},
                     max_new_tokens=20, ignore_eos=True)
        assert r.token_ids == ref.token_ids
        accepted += accepted_draft_tokens(r.stats)
        drafted += r.stats.draft_tokens
    assert 15 < accepted < drafted, (accepted, drafted)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_greedy_matches_plain_other_families(arch):
    t, d = tiny_model(arch, seed=3, layers=2), tiny_model(arch, seed=4, layers=1)
    p = _prompt(10, 3)
    assert generate(t, p, "draft", {"draft_model": d, "confidence_threshold": 0.0, "backoff": False},
                    max_new_tokens=30, ignore_eos=True).token_ids == _plain(t, p, 30).token_ids


def test_stops_like_plain_at_eos(target, twin):
    """Without ignore_eos the sink stops the draft method at the very token plain stops at."""
    for seed in range(6):
        p = _prompt(5, seed)
        ref = generate(target, p, "plain", max_new_tokens=40, eos_token_ids=(7, 11, 13))
        r = generate(target, p, "draft", {"draft_model": twin, "backoff": False}, max_new_tokens=40,
                     eos_token_ids=(7, 11, 13))
        assert (r.token_ids, r.finish_reason) == (ref.token_ids, ref.finish_reason)


# -- refusing a draft with another vocabulary -------------------------------------------------------
class _Tok:
    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]


def test_refuses_other_vocabulary(target):
    other = tiny_model("llama", seed=1, layers=1, vocab_size=89)
    with pytest.raises(UserError, match="vocabulary has 89 tokens but the target's has 97"):
        generate(target, _prompt(5), "draft", {"draft_model": other}, max_new_tokens=5)


def test_refuses_other_tokenizer():
    t, d = tiny_model("llama", seed=0, layers=1), tiny_model("llama", seed=1, layers=1)
    t.tokenizer = _Tok(["a", "b"])
    d.tokenizer = _Tok(["b", "a"])
    with pytest.raises(UserError, match="tokenizer differs"):
        generate(t, _prompt(5), "draft", {"draft_model": d}, max_new_tokens=5)


def test_needs_a_draft_model(target):
    with pytest.raises(UserError, match="needs a draft model"):
        generate(target, _prompt(5), "draft", max_new_tokens=5)
    with pytest.raises(UserError, match="does not exist"):
        generate(target, _prompt(5), "draft", {"draft_model": "/nonexistent/model"}, max_new_tokens=5)
    with pytest.raises(UserError, match="num_draft_tokens"):
        get_method("draft", {"num_draft_tokens": 40})
    with pytest.raises(UserError, match="confidence_threshold"):
        get_method("draft", {"confidence_threshold": "1.5"})
    with pytest.raises(UserError, match="siblings"):
        get_method("draft", {"siblings": 4})


# -- sibling leaves --------------------------------------------------------------------------------
def test_siblings_rank_nodes_by_path_probability():
    """Chain a b c (the draft's probabilities .9 .5 .4) with siblings x beside b (.3) and y beside c (.35):
    the likeliest nodes first, every parent before its children, a sibling right after the chain token
    beside it at equal rank; a budget of 4 keeps the 4 likeliest."""
    d = ModelDrafter.__new__(ModelDrafter)
    d.stats = DecodeStats()
    a, b, c, x, y = 11, 12, 13, 21, 22
    chain = Draft.chain([a, b, c])
    alternatives = [[], [(x, 0.3)], [(y, 0.35)]]
    # priorities: a .9, b .45, c .18, x .9 * .3 = .27, y min(.45 * .35, .18) = .1575
    out = d._with_siblings(chain, 3, [0.9, 0.5, 0.4], alternatives, max_nodes=10)
    assert out.tokens == [a, b, x, c, y]
    assert out.parents == [-1, 0, 0, 1, 1]
    assert d.stats.extra["sibling_nodes"] == 2
    assert d._with_siblings(chain, 3, [0.9, 0.5, 0.4], alternatives, max_nodes=4).tokens == [a, b, x, c]
    capped = d._with_siblings(Draft.chain([a, b]), 2, [0.9, 0.2], [[], [(x, 0.7)]], max_nodes=10)
    assert capped.tokens == [a, b, x]                 # sampled b less likely than x: b is still tried first


def test_siblings_are_verified_and_accepted(target, small):
    """A 1-layer draft often ranks the target's token second: with siblings those calls keep it."""
    hits = 0
    for seed in range(6):
        p = _prompt(8, seed)
        ref = _plain(target, p, 30)
        r = generate(target, p, "draft", {"draft_model": small, "siblings": 2, "backoff": False}, max_new_tokens=30,
                     ignore_eos=True)
        assert r.token_ids == ref.token_ids
        assert r.stats.extra["sibling_nodes"] > 0
        hits += r.stats.extra.get("sibling_hits", 0)
    assert hits > 0


# -- sampling: exact distribution -------------------------------------------------------------------
V_SMALL = 8
RUNS = 600
PROMPT = [3, 7, 4]
# back-off off: it decides from wall time, and with it on most runs would be plain steps
DRAFT_OPTIONS = {"confidence_threshold": 0.0, "schedule": "constant", "num_draft_tokens": 2, "backoff": False}


def exact_pair_distribution(model, prompt: list[int], gen: GenerationConfig) -> torch.Tensor:
    """P(t2 = a, t3 = b) of the 2nd and 3rd generated tokens under plain sampling: (V, V)."""
    V = model.vocab_size

    def probs(ids):                                                        # (V,)
        return target_probs(model.forward(model.new_cache(1, len(ids) + 8), torch.tensor([ids]))[0, -1], gen)

    out = torch.zeros(V, V, dtype=torch.float64)
    p1 = probs(prompt)
    for t1 in range(V):
        if p1[t1] == 0:
            continue
        p2 = probs(prompt + [t1])
        for t2 in range(V):
            if p2[t2] > 0:
                out[t2] += p1[t1].double() * p2[t2].double() * probs(prompt + [t1, t2]).double()
    return out


def sampled_pairs(model, prompt, method: str, options: dict, gen: GenerationConfig, n: int,
                  min_accepted: int = 0) -> torch.Tensor:
    """Counts (V, V) of the 2nd and 3rd tokens over ``n`` seeded runs of ``method``; checks that at least
    ``min_accepted`` draft tokens were accepted in all (else the test would not exercise the verifier)."""
    m = get_method(method, options)
    V = model.vocab_size
    counts = torch.zeros(V, V, dtype=torch.float64)
    accepted = 0
    for seed in range(n):
        g = GenerationConfig(max_new_tokens=4, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                             seed=seed, ignore_eos=True)
        sink = TokenSink(gen=g, eos_token_ids=())
        m.decode(model, prompt, g, sink)
        counts[sink.tokens[1], sink.tokens[2]] += 1
        accepted += accepted_draft_tokens(sink.stats)
    assert accepted >= min_accepted, f"only {accepted} draft tokens accepted in {n} runs"
    return counts


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit, pooling cells with expected count < 5; impossible cells must stay empty."""
    counts, probs = counts.flatten(), probs.flatten() / probs.sum()
    assert counts[probs == 0].sum() == 0, "a token outside the target's support was produced"
    exp = probs * counts.sum()
    small = exp < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp > 0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()
                           ).pvalue)


@pytest.fixture(scope="module")
def small_vocab_pair():
    return (tiny_model("llama", seed=5, layers=2, vocab_size=V_SMALL),
            tiny_model("llama", seed=6, layers=1, vocab_size=V_SMALL))


SAMPLING = [GenerationConfig(temperature=1.0, top_k=3), GenerationConfig(temperature=0.7, top_p=0.9)]


@pytest.mark.parametrize("gen", SAMPLING, ids=["t1-top3", "t0.7-topp0.9"])
def test_sampling_is_exact(small_vocab_pair, gen):
    t, d = small_vocab_pair
    options = DRAFT_OPTIONS | {"draft_model": d}
    counts = sampled_pairs(t, PROMPT, "draft", options, gen, RUNS, min_accepted=RUNS // 4)
    assert chi2_pvalue(counts, exact_pair_distribution(t, PROMPT, gen)) > 1e-4


@pytest.mark.parametrize("gen", SAMPLING, ids=["t1-top3", "t0.7-topp0.9"])
def test_sampling_is_exact_with_siblings(small_vocab_pair, gen):
    """Siblings are deterministic leaves (one-hot q) tried after the sampled chain token beside them."""
    t, d = small_vocab_pair
    options = DRAFT_OPTIONS | {"draft_model": d, "siblings": 2}
    assert sum(generate(t, PROMPT, "draft", options, max_new_tokens=4, temperature=gen.temperature, top_k=gen.top_k,
                        top_p=gen.top_p, seed=s, ignore_eos=True).stats.extra.get("sibling_hits", 0)
               for s in range(40)) > 0
    counts = sampled_pairs(t, PROMPT, "draft", options, gen, RUNS, min_accepted=RUNS // 4)
    assert chi2_pvalue(counts, exact_pair_distribution(t, PROMPT, gen)) > 1e-4


def test_negative_control_siblings_before_the_sampled_token_are_detected(small_vocab_pair, monkeypatch):
    """Siblings tried before the sampled chain token beside them (a deterministic candidate chosen given the
    sample, then the sample against the residual): not the target distribution, and the test must say so."""
    t, d = small_vocab_pair
    rank = ChainDrafter._with_siblings

    def siblings_first(self, *args):
        draft = rank(self, *args)
        kids: dict[int, list[int]] = {}
        for i, p in enumerate(draft.parents):
            kids.setdefault(p, []).append(i)
        order, stack = [], list(kids.get(-1, []))     # pre-order with every node's children reversed
        while stack:
            i = stack.pop()
            order.append(i)
            stack.extend(kids.get(i, []))
        return draft.select(order)

    monkeypatch.setattr(ChainDrafter, "_with_siblings", siblings_first)
    gen = SAMPLING[0]
    counts = sampled_pairs(t, PROMPT, "draft", DRAFT_OPTIONS | {"draft_model": d, "siblings": 2}, gen, RUNS)
    assert chi2_pvalue(counts, exact_pair_distribution(t, PROMPT, gen)) < 1e-4


def test_negative_control_q_without_top_k_is_detected(small_vocab_pair, monkeypatch):
    """Tokens drawn with top-k but q reported without it (raw softmax): the test must fail.

    (Dropping q altogether would *not* be a bug: a sampled draft verified as a
    deterministic one stays exact, it is only accepted less often.)
    """
    t, d = small_vocab_pair
    pick = ChainDrafter._pick
    monkeypatch.setattr(ChainDrafter, "_pick", lambda self, logits: (pick(self, logits)[0], logits.softmax(-1)))
    gen = SAMPLING[0]
    counts = sampled_pairs(t, PROMPT, "draft", DRAFT_OPTIONS | {"draft_model": d}, gen, RUNS)
    assert chi2_pvalue(counts, exact_pair_distribution(t, PROMPT, gen)) < 1e-4


# -- the default model as its own draft ------------------------------------------------------------
@pytest.fixture(scope="module")
def default_twin():
    from paradecode import load_model

    return load_model(dtype="float32")


def test_default_model_with_itself_as_draft(default_model, default_twin):
    """Plumbing on the real model: a second instance drafts; greedy output equals plain."""
    for prompt in (PROMPTS[0], PROMPTS[5], PROMPTS[12]):
        ref = generate(default_model, prompt, "plain", chat=True, max_new_tokens=16)
        r = generate(default_model, prompt, "draft", {"draft_model": default_twin, "confidence_threshold": 0.0,
                                                      "backoff": False}, chat=True, max_new_tokens=16)
        assert r.token_ids == ref.token_ids
        assert r.stats.acceptance_rate >= 0.9                                  # same weights (float ties aside)
        assert r.stats.model_calls < ref.stats.model_calls


def test_default_model_path_option_loads_the_draft(default_model):
    """``draft_model`` as a string goes through load_model (here the default model's name)."""
    r = generate(default_model, PROMPTS[3], "draft", {"draft_model": "default", "backoff": False}, chat=True,
                 max_new_tokens=8)
    ref = generate(default_model, PROMPTS[3], "plain", chat=True, max_new_tokens=8)
    assert r.token_ids == ref.token_ids and r.stats.extra["draft_model"] == "SmolLM2-135M-Instruct"


def test_transformers_backend_as_draft(tiny_llama_pair):
    """The draft may run on the transformers adapter (its cache rolls back by slicing)."""
    hf, native = tiny_llama_pair
    p = _prompt(8, 2)
    r = generate(native, p, "draft", {"draft_model": hf, "confidence_threshold": 0.0, "backoff": False},
                 max_new_tokens=30, ignore_eos=True)
    assert r.token_ids == _plain(native, p, 30).token_ids
    assert r.stats.acceptance_rate > 0.9                                  # same weights, another implementation
