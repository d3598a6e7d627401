"""The trajectory visualiser: trace normalisation, pages for every method, CLI, and a real headless browser."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

import pytest

import paradecode as pd
from paradecode.cli import main
from paradecode.methods import all_methods
from paradecode.viz import call_rows, write_trajectory
from paradecode.viz.trace import CallRow, branches_of, cell_status

# -- normalising traces --------------------------------------------------------


def test_branches_of_chains_trees_and_candidate_sets():
    assert branches_of({"proposed": [1, 2, 3]}) == [[1, 2, 3]]
    assert branches_of({"proposed": [1, 2, 3], "parents": [-1, 0, 1]}) == [[1, 2, 3]]
    assert branches_of({"proposed": [1, 2, 3, 4], "parents": [-1, 0, 0, -1]}) == [[1, 2], [1, 3], [4]]
    assert branches_of({"proposed": [[1, 2], [], [3]]}) == [[1, 2], [3]]
    assert branches_of({"proposed": None}) == []


def test_rows_synthesised_from_accepted_lengths_when_nothing_is_recorded():
    rows = call_rows([], [7, 8, 9, 10], [1, 1, 2])
    assert [(r.kind, r.position, r.accepted) for r in rows] == [("prefill", 0, [7]), ("decode", 1, [8]),
                                                                ("decode", 2, [9, 10])]
    assert all(r.synthetic for r in rows)
    # lengths that do not cover the output (e.g. a method that records nothing) still show every token
    assert [r.accepted for r in call_rows(None, [7, 8, 9], [1])] == [[7], [8, 9]]


def test_unrecorded_prefill_is_prepended():
    trace = [{"kind": "verify", "position": 1, "proposed": [8, 5], "accepted": [8, 9], "probs": [0.9, 0.5]}]
    rows = call_rows(trace, [7, 8, 9], [1, 2])
    assert [(r.call, r.kind, r.accepted) for r in rows] == [(0, "prefill", [7]), (1, "verify", [8, 9])]
    assert rows[1].probs == [0.9, 0.5] and rows[1].branches == [[8, 5]]


def test_cell_status_marks_produced_right_and_wrong():
    row = CallRow(3, "jacobi", 1, accepted=[8, 9], branches=[[8, 4, 10, 11]])
    assert cell_status(row, [7, 8, 9, 10]) == {1: (8, "accepted"), 2: (9, "accepted"), 3: (10, "right"),
                                               4: (11, "wrong")}


# -- pages for every registered method ----------------------------------------------


def test_every_method_gets_a_page(tiny, tmp_path):
    drawn, unusable = [], []
    for name in all_methods():
        try:
            out = pd.generate(tiny, [5, 6, 7, 5, 6, 7, 5], name, max_new_tokens=12, ignore_eos=True, trace=True)
        except pd.UserError as e:            # e.g. a method needing a draft model or a diffusion model
            unusable.append((name, e.message))
            continue
        page, png = tmp_path / f"{name}.html", tmp_path / f"{name}.png"
        rows = write_trajectory(out, str(page), str(png), tokenizer=None, method=name)
        html = page.read_text()
        assert [t for r in rows for t in r.accepted][:len(out.token_ids)] == out.token_ids, name
        for i, t in enumerate(out.token_ids):
            assert f"position {i} · id {t} · produced" in html, (name, i)
        assert "http://" not in html and "https://" not in html and "src=" not in html   # self-contained
        assert png.stat().st_size > 2000
        drawn.append(name)
    assert {"plain", "jacobi", "lookahead", "pld"} <= set(drawn), unusable


def test_cli_writes_page_and_png(tmp_path, capsys):
    page = tmp_path / "page.html"
    rc = main(["viz", "--method", "lookahead", "-o", "window=3", "--prompt", "List five fruits.", "--chat",
               "--out", str(page), "--max-new-tokens", "16"])
    assert rc == 0
    assert page.exists() and (tmp_path / "page.png").exists()
    assert "lookahead" in page.read_text()
    rc = main(["viz", "--method", "plain", "--prompt", "Hi", "--out", str(tmp_path / "missing" / "p.html")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["viz", "--method", "plain", "--prompt", "Hi", "--out", str(tmp_path)])
    assert rc == 2 and "is a folder" in capsys.readouterr().err
    rc = main(["viz", "--method", "plain", "--prompt", "Hi", "--out", str(page), "--png", str(tmp_path / "no" / "p.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "--png" in err and "Traceback" not in err


# -- a real browser -------------------------------------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def _headless(browser: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                               "--disable-component-update", "--disable-sync", "--no-first-run",
                               f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_browser() is None, reason="no headless browser found (apt-get install chromium)")
def test_page_renders_in_a_headless_browser(default_model, tmp_path):
    import matplotlib.image

    out = pd.generate(default_model, "List the days of the week.", "jacobi", chat=True, max_new_tokens=20, trace=True)
    page = tmp_path / "page.html"
    write_trajectory(out, str(page), None, tokenizer=default_model.tokenizer)
    browser, url = _browser(), page.resolve().as_uri()

    shot = tmp_path / "shot.png"
    _headless(browser, f"--screenshot={shot}", "--window-size=1200,900", url)
    assert shot.exists() and shot.stat().st_size > 5000
    img = matplotlib.image.imread(str(shot))[..., :3]                       # (900, 1200, 3) floats
    assert img.shape[:2] == (900, 1200)
    non_white = (img < 0.95).any(-1).mean()
    assert non_white > 0.02 and img.std() > 0.02                             # not a blank page
    coloured = ((img.max(-1) - img.min(-1)) > 0.15).mean()
    assert coloured > 0.005                                                  # the per-call colours are drawn

    dom = _headless(browser, "--dump-dom", url).stdout
    assert 'id="trajectory"' in dom and 'id="calls"' in dom
    words = [w for w in (default_model.tokenizer.decode([t]).strip() for t in out.token_ids) if w.isalpha()]
    assert words and all(w in dom for w in words)
    assert dom.count('class="tok"') == len(out.token_ids)
