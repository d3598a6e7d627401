"""Diffusion samplers, rules, caches and the shipped task model."""

import pytest
import torch

from paradecode.diffusion import DIFFUSION_SAMPLERS, VOCAB, build_sampler, generate
from paradecode.diffusion import rules
from paradecode.diffusion.learn2pd import FEATURES, LogisticFilter
from paradecode.diffusion.model import BlockKVCache, DiffusionShape, DiffusionTransformer, load_shipped
from paradecode.diffusion.tasks import TASKS, eval_instances
from paradecode.diffusion.train import encode_instance
from paradecode.errors import UserError

torch.set_num_threads(1)   # tiny models: threads only add overhead on the shared CPU


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    shape = DiffusionShape(vocab_size=len(VOCAB), hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2,
                           head_dim=8, max_context=64, mask_id=VOCAB.mask_id, eos_id=VOCAB.eos_id)
    return DiffusionTransformer(shape).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return load_shipped()


@pytest.fixture(scope="module")
def filter_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("l2pd") / "filter.json"
    LogisticFilter(torch.tensor([8.0, 2.0, 0.0, 0.0, 0.5, 0.0]), -6.0).save(path, {})
    return str(path)


def prompt_of(task, i=0, seed=0):
    words, answer = eval_instances(task, i + 1, seed)[i]
    return words, encode_instance(words, answer, TASKS[task].gen_length)[0]


# -- pure rules ---------------------------------------------------------------------------------
def test_factor_rule_worked_example():
    conf = torch.tensor([[0.8, 0.99, 0.7, 0.1]])
    masked = torch.ones_like(conf, dtype=torch.bool)
    assert rules.factor_rule(conf, masked, 1.0).tolist() == [[True, True, False, False]]
    # tiny factor still commits the most confident one
    assert rules.factor_rule(conf, masked, 1e-6).tolist() == [[False, True, False, False]]


def test_threshold_rule_is_strict_and_commits_at_least_one():
    conf = torch.tensor([[1.0, 1.0, 0.5], [0.2, 0.3, 0.1]])
    masked = torch.tensor([[True, True, True], [True, False, True]])
    assert rules.threshold_rule(conf, masked, 1.0).tolist() == [[True, False, False], [True, False, False]]
    assert rules.threshold_rule(conf, masked, 0.4).tolist() == [[True, True, True], [True, False, False]]


def test_local_leap_relaxes_only_near_anchors():
    conf = torch.tensor([[0.95, 0.8, 0.8, 0.8, 0.8]])
    masked = torch.ones_like(conf, dtype=torch.bool)
    assert rules.local_leap_rule(conf, masked, 0.9, 0.75, 2).tolist() == [[True, True, True, False, False]]


def test_eot_fill_and_schedule_and_prophet():
    eos = VOCAB.eos_id
    tokens = torch.tensor([[5, 6, eos, 7, 8, 9]])
    committed = torch.tensor([[True, False, True, False, True, False]])
    assert rules.eot_fill(tokens, committed, eos).tolist() == [[False, False, False, True, True, True]]
    assert rules.llada_schedule(10, 4) == [3, 3, 2, 2]
    gap = torch.tensor([[8.0, 8.0], [1.0, 1.0]])
    masked = torch.ones(2, 2, dtype=torch.bool)
    assert rules.prophet_go_all_in(gap, masked, torch.tensor([0.0, 0.9]), (7.5, 5.0, 2.5)).tolist() == [True, False]


# -- the block loop -----------------------------------------------------------------------------
def _configs(filter_path):
    for name in DIFFUSION_SAMPLERS:
        for cache, block in (("none", 0), ("prefix", 5), ("dual", 5)):
            if name == "freedave" and cache != "none":
                continue
            opts = {"cache": cache, "block_length": block}
            if name == "learn2pd":
                opts["filter"] = filter_path
            yield name, opts


def test_every_sampler_commits_each_step_and_terminates(tiny, filter_path):
    for task in ("copy",):
        _, ids = prompt_of(task)
        G = TASKS[task].gen_length
        for name, opts in _configs(filter_path):
            r = build_sampler(name, opts).decode(tiny, ids, G)
            assert all(c >= 1 for c in r.committed_per_step), (name, opts)
            assert sum(r.committed_per_step) == G and not (r.answer == VOCAB.mask_id).any(), (name, opts)
            assert 1 <= r.nfe <= G + 2 * (G // (opts["block_length"] or G)), (name, opts)


def test_batch_of_two_matches_two_single_decodes(tiny):
    a, b = VOCAB.encode("<bos> copy : a b c d"), VOCAB.encode("<bos> reverse : d f b a")
    s = build_sampler("threshold", {"threshold": 0.3})
    both = s.decode(tiny, [a, b], 10).answer
    assert torch.equal(both[0], s.decode(tiny, a, 10).answer[0])
    assert torch.equal(both[1], s.decode(tiny, b, 10).answer[0])


class Recording:
    """Wraps a model and records every sequence it is called on."""

    def __init__(self, model):
        self.model, self.shape, self.calls = model, model.shape, []

    def forward(self, ids, **kw):
        self.calls.append(ids.clone())
        return self.model.forward(ids, **kw)


def test_threshold_one_reproduces_one_token_per_step_order(tiny, shipped):
    for model in (tiny, shipped):
        for task in ("sort", "latin"):
            _, ids = prompt_of(task)
            G = TASKS[task].gen_length
            ref, thr = Recording(model), Recording(model)
            a = generate(ref, ids, G, build_sampler("llada"))
            b = generate(thr, ids, G, build_sampler("threshold", {"threshold": 1.0}))
            assert torch.equal(a.x, b.x) and a.nfe == b.nfe == G
            assert all(torch.equal(p, q) for p, q in zip(ref.calls, thr.calls))
            assert b.committed_per_step == [1] * G


def test_caches_exact_when_nothing_changed(shipped, tiny):
    for model in (shipped, tiny):
        _, ids = prompt_of("latin")
        x = torch.tensor(ids + [VOCAB.mask_id] * 20)[None]
        x[0, len(ids):len(ids) + 3] = torch.tensor(VOCAB.encode("1 2 3"))
        P = len(ids)
        for mode in ("prefix", "dual"):
            cache = BlockKVCache(model, mode)
            full = cache.refresh(x, (P + 5, P + 10))
            torch.testing.assert_close(cache.step(x), full, rtol=1e-5, atol=1e-5)


def test_cached_decode_exact_when_each_block_is_one_step(shipped):
    # threshold 0 commits a whole block per step: only refresh (exact) logits are ever used
    _, ids = prompt_of("latin", 2)
    opts = {"threshold": 0.0, "block_length": 5}
    base = build_sampler("threshold", opts).decode(shipped, ids, 20)
    for cache in ("prefix", "dual"):
        r = build_sampler("threshold", {**opts, "cache": cache}).decode(shipped, ids, 20)
        assert torch.equal(r.x, base.x) and r.nfe == base.nfe == 4


# -- FreeDave: lossless -------------------------------------------------------------------------
def test_freedave_identical_to_one_token_per_step_on_many_seeds_and_tasks(shipped):
    ref_nfe = dave_nfe = 0
    for task in TASKS:
        for i in range(3):
            _, ids = prompt_of(task, i, seed=3)
            G = TASKS[task].gen_length
            for block in ((0, 5)[i % 2],):
                ref = build_sampler("llada", {"block_length": block}).decode(shipped, ids, G)
                dave = build_sampler("freedave", {"drafts": 4 + i % 5, "block_length": block}).decode(shipped, ids, G)
                assert torch.equal(ref.x, dave.x), (task, i, block)
                ref_nfe += ref.nfe
                dave_nfe += dave.nfe
    assert dave_nfe * 1.5 <= ref_nfe


def test_freedave_identical_on_random_tiny_model(tiny):
    for task in ("copy", "text"):
        for i in range(2):
            _, ids = prompt_of(task, i)
            G = TASKS[task].gen_length
            ref = build_sampler("llada").decode(tiny, ids, G)
            assert torch.equal(ref.x, build_sampler("freedave").decode(tiny, ids, G).x)


# -- configs, registry, shipped model --------------------------------------------------------------
def test_configs_are_validated_once_with_named_fields():
    with pytest.raises(UserError, match="threshold"):
        build_sampler("threshold", {"threshold": "1.5"})
    with pytest.raises(UserError, match="no option"):
        build_sampler("factor", {"tau": "1"})
    with pytest.raises(UserError, match="cache"):
        build_sampler("freedave", {"cache": "dual"})
    with pytest.raises(UserError, match="unknown diffusion sampler"):
        build_sampler("nope")
    assert build_sampler("llada", {"steps": "5", "remasking": "random"}).config.steps == 5
    assert set(DIFFUSION_SAMPLERS) == {"llada", "threshold", "factor", "prophet", "localleap", "learn2pd", "freedave"}
    assert len(FEATURES) == 6


def test_diffusion_samplers_not_in_autoregressive_registry():
    from paradecode.methods.base import all_methods

    assert not set(all_methods()) & set(DIFFUSION_SAMPLERS)


def test_shipped_model_copies_held_out_lists(shipped):
    ok = 0
    for words, ids in (prompt_of("copy", i, seed=11) for i in range(8)):
        r = build_sampler("llada").decode(shipped, ids, 10)
        ok += TASKS["copy"].check(words, VOCAB.decode(r.answer[0]).split())
    assert ok >= 7


def test_shipped_learn2pd_filter_loads_and_decodes(shipped):
    words, ids = prompt_of("sort", 1)
    r = build_sampler("learn2pd").decode(shipped, ids, 10)
    assert r.nfe <= 10 and not (r.answer == VOCAB.mask_id).any()


def test_cli_generate_and_samplers(capsys):
    from paradecode.cli import main

    assert main(["diffusion", "generate", "copy : a b c d", "--sampler", "freedave"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "a b c d" and "nfe=" in out
    assert main(["diffusion", "generate", "copy : a b zz", "--sampler", "threshold"]) == 2


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--out", "{blocker}/out"], "cannot write into"),
    (["train", "--steps", "1", "--out", "{missing}/w.safetensors"], "does not exist"),
    (["train", "--steps", "1", "--out", "{tmp}"], "is a folder"),
    (["train-filter", "--out", "{missing}/f.json"], "does not exist"),
])
def test_cli_checks_where_it_writes_before_the_work(capsys, tmp_path, argv, needle):
    """A bench or a training run that could not save its result fails at once, not after the work."""
    from paradecode.cli import main

    (tmp_path / "blocker").write_text("")
    paths = {"blocker": tmp_path / "blocker", "missing": tmp_path / "missing", "tmp": tmp_path}
    assert main(["diffusion", *(a.format(**paths) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_training_is_deterministic_and_resumable(tmp_path):
    from paradecode.diffusion.train import TrainConfig, train

    cfg = TrainConfig(steps=4, batch_size=4, hidden=32, layers=1, heads=2, intermediate=32, warmup=2,
                      checkpoint_every=100)
    full = train(cfg, tmp_path / "a.safetensors", progress=False)
    assert train(cfg, tmp_path / "b.safetensors", progress=False, stop_after=2) is None
    resumed = train(cfg, tmp_path / "b.safetensors", progress=False)
    for (name, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


# -- bad input on the CLI: one line naming the problem and the fix, exit 2, no traceback ---------------
def _bad_weights(tmp_path, kind):
    """A file (or folder) that is not diffusion weights, of the given kind."""
    from safetensors.torch import save_file

    names = {"text": "notmodel.txt", "empty-gguf": "empty.gguf", "folder": "adir"}
    p = tmp_path / names.get(kind, f"{kind}.safetensors")
    if kind == "text":
        p.write_text("hello\n")
    elif kind == "empty-gguf":
        p.write_bytes(b"")
    elif kind == "folder":
        p.mkdir()
    elif kind == "other-model":          # a whole safetensors file of another model: no "shape" metadata
        save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(p), metadata={"format": "pt"})
    elif kind == "wrong-tensors":        # our metadata, someone else's tensors
        save_file({"a": torch.zeros(2)}, str(p), metadata={"shape": '{"vocab_size": 8, "hidden": 4, '
                  '"intermediate": 4, "layers": 1, "heads": 1, "kv_heads": 1, "head_dim": 4}'})
    elif kind == "truncated":
        good = tmp_path / "good.safetensors"
        DiffusionTransformer(DiffusionShape(vocab_size=len(VOCAB), hidden=8, intermediate=8, layers=1, heads=1,
                                            kv_heads=1, head_dim=8)).save(good)
        p.write_bytes(good.read_bytes()[:-16])
    return p


BAD_WEIGHTS = {"text": "not a whole safetensors file", "empty-gguf": "not a whole safetensors file",
               "folder": "is a folder", "other-model": '"shape" metadata', "wrong-tensors": "tensor",
               "truncated": "not a whole safetensors file"}


@pytest.mark.parametrize("kind", list(BAD_WEIGHTS))
def test_cli_generate_refuses_what_is_not_diffusion_weights(capsys, tmp_path, kind):
    from test_cli import assert_one_line_error, run_cli

    p = _bad_weights(tmp_path, kind)
    code, out, err = run_cli(capsys, "diffusion", "generate", "sort : d a c b", "--weights", str(p))
    assert_one_line_error(code, err, str(p), BAD_WEIGHTS[kind], "paradecode diffusion train")
    assert not out


@pytest.mark.parametrize("argv", [
    ["train", "--steps", "1", "--out", "{tmp}/w.safetensors", "--init", "{bad}"],
    ["train-filter", "--out", "{tmp}/f.json", "--weights", "{bad}"],
    ["bench", "--out", "{tmp}/bench", "-n", "1", "--weights", "{bad}"],
])
def test_cli_every_weights_option_refuses_a_non_model_file(capsys, tmp_path, argv):
    from test_cli import assert_one_line_error, run_cli

    bad = _bad_weights(tmp_path, "text")
    code, _, err = run_cli(capsys, "diffusion", *(a.format(tmp=tmp_path, bad=bad) for a in argv))
    assert_one_line_error(code, err, str(bad), "not a whole safetensors file")
    assert sorted(x.name for x in tmp_path.iterdir()) == [bad.name]     # nothing written, no folder made


def test_cli_init_of_another_shape_is_refused(capsys, tmp_path):
    from test_cli import assert_one_line_error, run_cli

    small = tmp_path / "small.safetensors"
    DiffusionTransformer(DiffusionShape(vocab_size=len(VOCAB), hidden=8, intermediate=8, layers=1, heads=1,
                                        kv_heads=1, head_dim=8)).save(small)
    code, _, err = run_cli(capsys, "diffusion", "train", "--steps", "1", "--out", str(tmp_path / "w.safetensors"),
                           "--init", str(small))
    assert_one_line_error(code, err, "--init", "another shape", "hidden 8 (this run: 128)")


@pytest.mark.parametrize("command", [
    ["generate", "sort : d a c b"],
    ["train", "--steps", "1", "--out", "{tmp}/w.safetensors"],
    ["bench", "-n", "1", "--out", "{tmp}/bench"],
])
@pytest.mark.parametrize("threads", ["0", "-1", "100000"])
def test_cli_threads_out_of_range_are_refused_before_any_work(capsys, tmp_path, command, threads):
    from test_cli import assert_one_line_error, run_cli

    code, out, err = run_cli(capsys, "diffusion", *(a.format(tmp=tmp_path) for a in command), "--threads", threads)
    assert_one_line_error(code, err, f"got {threads}", "--threads")
    assert not out and not list(tmp_path.iterdir())


def test_cli_bench_names_a_bad_task_even_with_bad_threads(capsys):
    from test_cli import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "diffusion", "bench", "--tasks", "nope", "--threads", "0")
    assert_one_line_error(code, err, "unknown task 'nope'", "sort")


@pytest.mark.parametrize("content, needle", [
    ("hello", "not readable JSON"),
    ('{"weight": [1, 2], "bias": 0}', '"weight" list of 6 numbers'),
    ("[1, 2, 3]", '"weight" list of 6 numbers'),
    (None, "is a folder"),
])
def test_cli_learn2pd_refuses_a_bad_filter_file(capsys, tmp_path, content, needle):
    from test_cli import assert_one_line_error, run_cli

    path = tmp_path / "filter.json"
    path.mkdir() if content is None else path.write_text(content)
    code, _, err = run_cli(capsys, "diffusion", "generate", "sort : d a c b", "--sampler", "learn2pd",
                           "-o", f"filter={path}")
    assert_one_line_error(code, err, "Learn2PD filter", str(path), needle, "train-filter")


def test_cli_unknown_sampler_option_says_sampler(capsys):
    from test_cli import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "diffusion", "generate", "sort : d a c b", "-o", "nope=1")
    assert_one_line_error(code, err, "sampler threshold has no option 'nope'", "block_length, cache, threshold")
    assert "method" not in err


def test_cli_diffusion_without_a_subcommand_is_a_usage_error(capsys):
    from paradecode.cli import main

    assert main(["diffusion"]) == 2
    out, err = capsys.readouterr()
    assert not out and "generate" in err and "Traceback" not in err


@pytest.mark.parametrize("args, needles", [
    (["--lr", "nan"], ["--lr", "got nan"]),
    (["--lr", "-1"], ["--lr", "> 0"]),
    (["--lr", "0"], ["--lr", "> 0"]),
    (["--warmup", "-1"], ["--warmup", ">= 0"]),
    (["--seed", "-1"], ["--seed"]),
    (["--seed", "99999999999999999999"], ["--seed"]),
    (["--mix", "reverse=nan"], ["--mix", "reverse", "'nan'"]),
    (["--mix", "reverse=-1"], ["--mix", "reverse", ">= 0"]),
    (["--mix", "reverse"], ["--mix", "no weight"]),
    (["--mix", "nope=1"], ["--mix", "unknown task 'nope'", "sort"]),
    (["--mix", ",".join(f"{t}=0" for t in TASKS)], ["--mix", "every task has weight 0"]),
])
def test_cli_train_refuses_bad_values_before_any_work(capsys, tmp_path, args, needles):
    from test_cli import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "diffusion", "train", "--steps", "1", "--out", str(tmp_path / "w.safetensors"),
                           *args)
    assert_one_line_error(code, err, *needles)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("n", ["0", "-5"])
def test_cli_train_filter_refuses_per_task_below_one(capsys, tmp_path, n):
    from test_cli import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "diffusion", "train-filter", "--out", str(tmp_path / "f.json"), "--per-task", n)
    assert_one_line_error(code, err, "--per-task", f"got {n}")
    assert not list(tmp_path.iterdir())


def test_cli_train_rerun_of_a_finished_run_and_a_changed_run(capsys, tmp_path):
    """A finished run run again says so and changes nothing; the same --out with other settings is refused
    in one line that names the settings that differ and how to go on."""
    from test_cli import assert_one_line_error, run_cli

    out = tmp_path / "w.safetensors"
    code, stdout, _ = run_cli(capsys, "diffusion", "train", "--steps", "1", "--out", str(out))
    assert code == 0 and "wrote" in stdout
    before = out.read_bytes()
    code, stdout, err = run_cli(capsys, "diffusion", "train", "--steps", "1", "--out", str(out))
    assert code == 0 and "already trained" in stdout and "Traceback" not in err
    assert out.read_bytes() == before
    code, _, err = run_cli(capsys, "diffusion", "train", "--steps", "2", "--lr", "1e-3", "--out", str(out))
    assert_one_line_error(code, err, "other settings", "--steps 1 (now 2)", "--lr 0.002 (now 0.001)",
                          "another --out", "w.ckpt.pt")
    (tmp_path / "w.ckpt.pt").write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "diffusion", "train", "--steps", "1", "--out", str(out))
    assert_one_line_error(code, err, "cannot read the training checkpoint", "w.ckpt.pt")


def test_train_of_a_finished_run_writes_its_weights_again(tmp_path):
    """train() on a complete checkpoint (its output deleted) trains no step and writes the same weights."""
    from paradecode.diffusion.train import TrainConfig, train

    cfg = TrainConfig(steps=2, batch_size=2, hidden=16, layers=1, heads=2, intermediate=16, warmup=1)
    first = train(cfg, tmp_path / "a.safetensors", progress=False)
    (tmp_path / "a.safetensors").unlink()
    again = train(cfg, tmp_path / "a.safetensors", progress=False)
    for (name, p), q in zip(first.state_dict().items(), DiffusionTransformer.load(tmp_path / "a.safetensors")
                            .state_dict().values()):
        assert torch.equal(p, q), name
    assert again is not None
