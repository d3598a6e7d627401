"""The benchmark: suites, metrics, an end-to-end run on a tiny model, exactness detection, resume, CLI."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest

from paradecode.bench.metrics import aggregate, first_difference, per_prompt, repeat_range, summarise
from paradecode.bench.prompts import CATEGORIES, BenchPrompt, load_prompts, load_suite
from paradecode.bench.runner import RESULTS_FILE, BenchConfig, parse_sweep, run_benchmark
from paradecode.errors import UserError
from paradecode.methods.base import REGISTRY, option, register
from paradecode.methods.plain import Plain
from paradecode.models import kernels
from test_cli import assert_one_line_error, run_cli

EXACT, WRONG = "test-exact", "test-wrong"


@dataclasses.dataclass(frozen=True)
class _Opts:
    draft_len: int = option(4, "unused; lets the test sweep an option")


class _Exact(Plain):
    """Plain decoding under another name: a lossless method that is exact."""

    name = EXACT
    Config = _Opts
    family = "draft-and-verify"


class _Wrong(Plain):
    """Claims to be lossless but changes its third token: must be caught as inexact."""

    name = WRONG
    family = "draft-and-verify"

    def decode_batch(self, model, prompts, gen, sinks):
        for sink in sinks:
            emit = sink.emit

            def patched(new, emit=emit, sink=sink):
                new = [(t + 1) % model.vocab_size if len(sink.tokens) == 2 and i == 0 else t
                       for i, t in enumerate(new)]
                return emit(new)
            sink.emit = patched
        super().decode_batch(model, prompts, gen, sinks)


@pytest.fixture
def test_methods():
    """Register the two test-only methods; remove them afterwards."""
    for cls in (_Exact, _Wrong):
        register(cls)
    yield
    for cls in (_Exact, _Wrong):
        REGISTRY.pop(cls.name, None)


@pytest.fixture(scope="module")
def tiny_lm():
    from paradecode.bench.runner import load_bench_model

    return load_bench_model("tiny", BenchConfig())


def _prompts(n: int = 3) -> list[BenchPrompt]:
    base = [5, 9, 14, 5, 9, 14, 22, 31, 5, 9]
    return [BenchPrompt(id=f"qa-t{i}", category="qa", source="test", licence="Apache-2.0",
                        ids=tuple(base[i:] + [40 + i])) for i in range(n)]


def _cfg(tmp_path, **kw) -> BenchConfig:
    base = dict(models=["tiny"], methods=[EXACT, WRONG], max_new_tokens=12, out=tmp_path, peers=[], warmup=1)
    return BenchConfig(**{**base, **kw})


# -- suites ---------------------------------------------------------------------------

def test_every_category_has_ten_prompts_with_source_and_licence():
    for c in CATEGORIES:
        prompts = load_suite(c)
        assert len(prompts) >= 10, c
        assert len({p.id for p in prompts}) == len(prompts)
        for p in prompts:
            assert p.category == c and p.source and p.licence
            assert p.messages or p.text
    code = load_suite("code")
    assert all("HumanEval/" in p.source and "MIT" in p.licence for p in code)
    assert len(load_prompts(["qa", "math"], 2)) == 4


def test_unknown_category_is_a_user_error():
    with pytest.raises(UserError, match="unknown category"):
        load_prompts(["poetry"])


# -- metrics --------------------------------------------------------------------------

def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference([], []) is None


def test_aggregate_uses_token_weighted_speed_and_median_over_repeats():
    def line(pid, rep, wall, plain_wall, exact=True):
        return {"model": "m", "method": "x", "prompt_id": pid, "category": "qa", "repeat": rep, "exact": exact,
                "first_diff": None if exact else 3, "plain": {"new_tokens": 10, "wall": plain_wall},
                "run": {"new_tokens": 10, "wall": wall, "model_calls": 6, "accepted_sum": 10,
                        "accepted_count": 5, "accepted_histogram": {"2": 5}, "draft": 0.1}}
    lines = [line("a", 0, 1.0, 2.0), line("a", 1, 3.0, 2.0), line("a", 2, 1.0, 2.0),   # median wall 1.0
             line("b", 0, 2.0, 2.0, exact=False)]
    rows = per_prompt(lines)
    assert len(rows) == 2
    f = aggregate(rows)
    assert f["tokens_per_s"] == pytest.approx(20 / 3.0)
    assert f["plain_tokens_per_s"] == pytest.approx(20 / 4.0)
    assert f["speedup"] == pytest.approx(4.0 / 3.0)
    assert f["mat"] == pytest.approx(2.0)
    assert f["calls_per_token"] == pytest.approx(12 / 20)
    assert f["exactness"] == 0.5
    assert f["decode_speedup"] is None                          # these lines carry no prefill times


def test_decode_phase_speedup_takes_each_runs_prefill_out_of_its_wall_time():
    def line(pid, rep, wall, prefill, plain_wall, plain_prefill):
        return {"model": "m", "method": "x", "prompt_id": pid, "category": "qa", "repeat": rep, "exact": True,
                "first_diff": None, "plain": {"new_tokens": 10, "wall": plain_wall, "prefill": plain_prefill},
                "run": {"new_tokens": 10, "wall": wall, "prefill": prefill, "model_calls": 6, "accepted_sum": 10,
                        "accepted_count": 5, "accepted_histogram": {"2": 5}, "draft": 0.1}}
    rows = per_prompt([line("a", 0, 1.5, 0.5, 3.5, 0.5), line("b", 0, 2.0, 1.0, 5.0, 1.0)])
    f = aggregate(rows)
    assert f["speedup"] == pytest.approx(8.5 / 3.5)
    assert f["decode_speedup"] == pytest.approx((3.0 + 4.0) / (1.0 + 1.0))
    # one line without a prefill time (a peer that does not report it): no decode-phase figure
    rows = per_prompt([line("a", 0, 1.5, None, 3.5, 0.5), line("b", 0, 2.0, 1.0, 5.0, 1.0)])
    assert aggregate(rows)["decode_speedup"] is None


def test_speedup_range_is_computed_one_repeat_at_a_time():
    def line(pid, rep, wall, plain_wall):
        return {"model": "m", "method": "x", "prompt_id": pid, "category": "qa", "repeat": rep, "exact": True,
                "first_diff": None, "plain": {"new_tokens": 10, "wall": plain_wall},
                "run": {"new_tokens": 10, "wall": wall, "model_calls": 6, "accepted_sum": 10,
                        "accepted_count": 5, "accepted_histogram": {"2": 5}, "draft": 0.1}}
    # repeat 0: (20 / 2) / (20 / 4) = 2.0; repeat 1: (20 / 4) / (20 / 4) = 1.0
    lines = [line("a", 0, 1.0, 2.0), line("b", 0, 1.0, 2.0), line("a", 1, 2.0, 2.0), line("b", 1, 2.0, 2.0)]
    assert repeat_range(lines) == pytest.approx((1.0, 2.0))
    assert repeat_range(lines[:2]) is None                      # one repeat: no range
    figs = summarise(lines, ["qa"])["m"]["x"]
    assert figs["overall"]["speedup_range"] == pytest.approx((1.0, 2.0))
    assert figs["categories"]["qa"]["speedup_range"] == pytest.approx((1.0, 2.0))


def test_parse_sweep():
    assert parse_sweep("pld:max-draft=2,4") == ("pld", "max_draft", ["2", "4"])
    with pytest.raises(UserError):
        parse_sweep("pld=2,4")


# -- end to end -----------------------------------------------------------------------

def test_end_to_end_report_and_exactness(tmp_path, test_methods, tiny_lm):
    report = run_benchmark(_cfg(tmp_path, repeats=2), models=[tiny_lm], prompts=_prompts())
    for name in ("report.md", "report.json", "results.jsonl", "speedup.png", "accepted.png"):
        assert (tmp_path / name).is_file(), name
    parsed = json.loads((tmp_path / "report.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / RESULTS_FILE).read_text().splitlines()]
    assert len(lines) == 2 * 3 * 2                              # methods × prompts × repeats
    res = parsed["results"]["tiny"]
    assert res[EXACT]["overall"]["exactness"] == 1.0
    assert res[EXACT]["overall"]["mat"] == pytest.approx(1.0)
    assert res[EXACT]["overall"]["speedup"] > 0 and res[EXACT]["overall"]["decode_speedup"] > 0
    assert res[WRONG]["overall"]["exactness"] == 0.0           # the planted non-exact method is caught
    fails = parsed["exactness_failures"]
    assert {f["method"] for f in fails} == {WRONG} and all(f["first_diff"] == 2 for f in fails)
    assert all(ln["first_diff"] == 2 for ln in lines if ln["method"] == WRONG)
    md = (tmp_path / "report.md").read_text()
    assert "EXACTNESS FAILURES" in md and "qa" in md and parsed["machine"]["cpu"]
    assert "Decode-phase speedup" in md and "speedup per repeat (min–max)" in md
    assert len(res[EXACT]["overall"]["speedup_range"]) == 2    # two repeats: a range
    assert parsed["machine"]["versions"]["torch"] and "transformers" in parsed["machine"]["versions"]
    assert f"kernels: {kernels.describe()}" in md and parsed["machine"]["kernels"] == kernels.describe()
    assert report["categories"] == ["qa"]


def test_the_kernels_paths_are_described(monkeypatch):
    """A report names the instruction paths its figures come from: AMX tiles change them (session 21)."""
    text = kernels.describe()
    assert ("AMX tiles for" in text) == (kernels.amx() or kernels.bf16_amx())
    monkeypatch.setattr(kernels, "_load", lambda: None)
    monkeypatch.setattr(kernels, "FAILURE", "no C compiler")
    assert kernels.describe() == "unavailable (no C compiler): PyTorch's products"


def test_resume_measures_only_missing_lines(tmp_path, test_methods, tiny_lm):
    cfg = _cfg(tmp_path, methods=[EXACT])
    first = run_benchmark(cfg, models=[tiny_lm], prompts=_prompts())
    assert first["lines_measured_now"] == 3
    path = tmp_path / RESULTS_FILE
    kept = path.read_text().splitlines()[:1]
    path.write_text(kept[0] + "\n" + '{"config": "cut mid-wri')      # an interrupted run
    seen = []
    again = run_benchmark(cfg, models=[tiny_lm], prompts=_prompts(), on_line=seen.append)
    assert again["lines_measured_now"] == 2 and len(seen) == 2
    assert json.loads(kept[0])["prompt_id"] not in {ln["prompt_id"] for ln in seen}
    assert again["lines"] == 3
    nothing = run_benchmark(cfg, models=[tiny_lm], prompts=_prompts())
    assert nothing["lines_measured_now"] == 0
    with pytest.raises(UserError, match="other settings"):
        run_benchmark(_cfg(tmp_path, methods=[EXACT], max_new_tokens=5), models=[tiny_lm], prompts=_prompts())
    fresh = run_benchmark(_cfg(tmp_path, methods=[EXACT], max_new_tokens=5, fresh=True), models=[tiny_lm],
                          prompts=_prompts())
    assert fresh["lines_measured_now"] == 3


def test_cli_with_peer_and_sweep(tmp_path, test_methods):
    from paradecode.cli import main

    out = tmp_path / "run"
    code = main(["bench", "--model", "tiny", "--methods", EXACT, "--categories", "qa", "--num-prompts", "2",
                 "--max-new-tokens", "8", "--peers", "transformers,llama.cpp", "--sweep", f"{EXACT}:draft_len=2,3",
                 "--out", str(out), "--warmup", "0"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    methods = report["results"]["tiny"]
    assert set(methods) == {EXACT, f"{EXACT}[draft_len=2]", f"{EXACT}[draft_len=3]", "peer:transformers"}
    assert methods["peer:transformers"]["overall"]["mat"] is None
    assert methods["peer:transformers"]["overall"]["tokens_per_s"] > 0
    assert methods["peer:transformers"]["overall"]["decode_speedup"] > 0    # its time to the first token is known
    assert report["command"].startswith("paradecode bench")
    assert (out / "sweep.png").is_file()
    assert any("llama.cpp" in n for n in report["notes"]) or "peer:llama.cpp" in methods


def test_cli_rejects_bad_input(tmp_path, capsys):
    from paradecode.cli import main

    assert main(["bench", "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["bench", "--categories", "poetry", "--out", str(tmp_path), "--methods", "plain"]) == 2
    capsys.readouterr()
    (tmp_path / "a-file").write_text("")
    assert main(["bench", "--out", str(tmp_path / "a-file" / "out"), "--methods", "plain", "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the benchmark's results" in err and "Traceback" not in err


class _NeedsConfig(Plain):
    name = "test-needs-config"
    family = "draft-and-verify"

    def decode_batch(self, model, prompts, gen, sinks):
        raise UserError("method test-needs-config needs a draft model", "pass -o draft_model=PATH")


def test_method_unusable_as_configured_is_skipped_with_a_note(tmp_path, tiny_lm):
    register(_NeedsConfig)
    try:
        report = run_benchmark(_cfg(tmp_path, methods=[_NeedsConfig.name], warmup=0), models=[tiny_lm],
                               prompts=_prompts(2))
    finally:
        REGISTRY.pop(_NeedsConfig.name, None)
    assert report["lines"] == 0 and report["lines_measured_now"] == 0
    assert any("needs a draft model" in n for n in report["notes"])


def test_bad_method_option_is_a_user_error(tmp_path, test_methods, tiny_lm):
    with pytest.raises(UserError, match="no option"):
        run_benchmark(_cfg(tmp_path, sweeps=[f"{EXACT}:nope=1,2"]), models=[tiny_lm], prompts=_prompts(1))


def test_report_only_uses_the_lines_present(tmp_path, test_methods, tiny_lm):
    run_benchmark(_cfg(tmp_path, methods=[EXACT]), models=[tiny_lm], prompts=_prompts(2))
    report = run_benchmark(_cfg(tmp_path, methods=[EXACT, WRONG], report_only=True), models=[tiny_lm],
                           prompts=_prompts(3))
    assert report["lines_measured_now"] == 0 and report["lines"] == 2
    assert set(report["results"]["tiny"]) == {EXACT}
    assert any("2 of 6 requested lines" in n for n in report["notes"])


# -- bad input: refused in one line, before anything in --out is touched ---------------

def _bench_argv(out, *extra: str) -> list[str]:
    return ["bench", "--model", "tiny", "--categories", "qa", "--num-prompts", "1", "--max-new-tokens", "4",
            "--peers", "none", "--warmup", "0", "--out", str(out), *extra]


def _snapshot(folder) -> dict:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.fixture
def measured(tmp_path, test_methods, tiny_lm):
    """An --out folder holding one measured line of EXACT and its report."""
    from rich.console import Console

    out = tmp_path / "run"
    run_benchmark(_cfg(out, methods=[EXACT], warmup=0, max_new_tokens=4), models=[tiny_lm], prompts=_prompts(1),
                  console=Console(file=io.StringIO()))
    assert (out / RESULTS_FILE).read_text().strip()
    return out


def test_report_only_with_fresh_is_refused_and_deletes_nothing(capsys, measured):
    before = _snapshot(measured)
    code, _, err = run_cli(capsys, *_bench_argv(measured, "--methods", EXACT, "--max-new-tokens", "12",
                                                "--report-only", "--fresh"))
    assert_one_line_error(code, err, "--report-only", "--fresh")
    assert _snapshot(measured) == before


def test_fresh_keeps_the_old_lines_until_a_new_one_replaces_them(capsys, measured):
    before = _snapshot(measured)
    code, _, err = run_cli(capsys, *_bench_argv(measured, "--methods", "nope", "--fresh"))
    assert_one_line_error(code, err, "unknown method")
    assert _snapshot(measured) == before                         # a refused --fresh run deletes nothing
    code, _, err = run_cli(capsys, *_bench_argv(measured, "--methods", EXACT, "--fresh"))
    assert code == 0, err
    lines = (measured / RESULTS_FILE).read_text().splitlines()
    assert len(lines) == 1 and lines[0] != before[RESULTS_FILE].decode().splitlines()[0]


@pytest.mark.parametrize("args, needles", [
    (["--methods", ""], ["--methods is empty"]),
    (["--methods", ","], ["--methods is empty"]),
    (["--methods", "plain"], ["nothing to measure", "baseline", "--methods"]),
    (["--categories", ""], ["--categories is empty"]),
    (["--peers", ""], ["--peers is empty", "--peers none"]),
    (["--methods", "pld", "-o", "jacobi:nope=1"], ["jacobi", "not in this run", "--methods"]),
    (["--methods", "pld", "--sweep", "jacobi:max_ngram=1,2"], ["jacobi", "not in this run", "--sweep"]),
    (["--methods", "pld", "-o", "pld:nope=1"], ["no option 'nope'"]),
    (["--methods", "pld", "-o", "pld:max_ngram=3", "-o", "pld:max_ngram=5"], ["pld:max_ngram given twice"]),
    (["--methods", "pld", "-o", "plain:x=1"], ["plain has no option"]),
    (["--methods", "draft", "--draft-model", "/does/not/exist"], ["/does/not/exist", "does not exist",
                                                                   "--draft-model"]),
    (["--methods", "draft", "-o", "draft:draft_model=/does/not/exist"], ["does not exist", "-o draft:draft_model"]),
    (["--methods", "draft"], ["needs a draft model", "--draft-model"]),
    (["--repeats", "0"], ["--repeats must be ≥ 1, got 0"]),
    (["--warmup", "-1"], ["--warmup must be ≥ 0"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens must be ≥ 1"]),
    (["--seed", "-1"], ["seed"]),
    (["--report-only", "--fresh"], ["--report-only", "--fresh"]),
    (["--report-only"], ["no results to report", "--out"]),
])
def test_cli_refuses_before_touching_out_or_loading_a_model(capsys, tmp_path, args, needles):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *_bench_argv(out, *args))
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_draft_model_that_is_not_a_model_is_named_with_its_flag(capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("")
    code, _, err = run_cli(capsys, *_bench_argv(tmp_path / "out", "--methods", "draft", "--draft-model", str(notes)))
    assert_one_line_error(code, err, "not a .gguf file", "--draft-model")
    code, _, err = run_cli(capsys, *_bench_argv(tmp_path / "out", "--methods", "draft", "--draft-model", str(tmp_path)))
    assert_one_line_error(code, err, "has no config.json", "--draft-model")
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(capsys, tmp_path):
    f = tmp_path / "notmodel.txt"
    f.write_text("keep me")
    code, _, err = run_cli(capsys, *_bench_argv(f, "--methods", "pld"))
    assert_one_line_error(code, err, "is a file", "--out needs a folder")
    assert f.read_text() == "keep me"


def test_report_only_checks_peers_and_refuses_an_empty_selection(capsys, measured):
    before = _snapshot(measured)
    code, _, err = run_cli(capsys, *_bench_argv(measured, "--methods", EXACT, "--report-only", "--peers", "nope"))
    assert_one_line_error(code, err, "unknown peer 'nope'")
    code, _, err = run_cli(capsys, *_bench_argv(measured, "--methods", WRONG, "--report-only"))
    assert_one_line_error(code, err, "none of the 1 requested lines", "--methods")
    assert _snapshot(measured) == before                         # the report these lines made is kept
    report = run_benchmark(_cfg(measured, methods=[EXACT], max_new_tokens=4, report_only=True), prompts=_prompts(1))
    assert report["lines"] == 1                                  # the settings of the run: the report is rebuilt


def test_default_run_skips_a_method_without_its_draft_model_with_a_note(tmp_path):
    from paradecode.bench.runner import build_variants

    notes: list[str] = []
    keys = {v.key for v in build_variants(BenchConfig(out=tmp_path, peers=[]), notes)}
    assert "draft" not in keys and "pld" in keys
    assert any(n.startswith("draft: skipped") and "--draft-model" in n for n in notes)


def test_cli_fails_when_every_method_was_skipped(capsys, tmp_path):
    register(_NeedsConfig)
    try:
        code, _, err = run_cli(capsys, *_bench_argv(tmp_path / "out", "--methods", _NeedsConfig.name))
    finally:
        REGISTRY.pop(_NeedsConfig.name, None)
    assert code == 2 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("paradecode: error:")]
    assert len(errors) == 1 and "nothing was measured" in errors[0]
    assert "needs a draft model" in err                          # the note says why


# -- llama.cpp peer -------------------------------------------------------------------

def test_llamacpp_peer_decodes_greedily_from_the_default_gguf():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional extra 'llamacpp')")
    from paradecode.bench.peers import LlamaCpp, PeerContext
    from paradecode.models.loading import default_gguf

    default_gguf()                     # part of every set-up: its absence is a failure, not a skip
    peer = LlamaCpp(PeerContext(model_spec=None, eos_token_ids=(2,), pad_token_id=2, threads=1))
    assert peer.setup() is None
    ids = peer.llm.tokenize(b"The three primary colours are", add_bos=False)
    tokens, wall, first = peer.generate(ids, 8)
    assert 0 < len(tokens) <= 8 and all(type(t) is int for t in tokens)
    assert 0 < first < wall                                       # time to the first token, inside the run
    assert peer.generate(ids, 8)[0] == tokens                      # greedy: the same tokens every time


@pytest.mark.parametrize("returncode, stderr, expected", [
    (0, "", None),
    (-11, "", "crashed in a smoke test (signal 11)"),
    (1, "Traceback ...\nValueError: Failed to load model from file", "Failed to load model"),
])
def test_llamacpp_smoke_test_turns_a_crashing_build_into_a_skip_note(monkeypatch, tmp_path, returncode,
                                                                    stderr, expected):
    import subprocess

    from paradecode.bench import peers

    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(subprocess, "run", fake_run)
    note = peers.smoke_test_llama(tmp_path / "m.gguf")
    assert seen["cmd"][-1] == str(tmp_path / "m.gguf")            # the child decodes the same file
    if expected is None:
        assert note is None
    else:
        assert expected in note
    if returncode < 0:
        assert "AMX" in note and "--no-binary llama-cpp-python" in note   # says how to fix it
