"""A self-contained HTML page of a decoding trajectory (inline CSS and JS, nothing external).

In the spirit of the decoding dependency graph visualiser (DDGviz) of
Santilli et al. 2023: the output coloured by the call that produced each
token, a table of what each call proposed and kept, and a trajectory grid
(calls x output positions) showing how guesses converged. Hovering a token
shows its call, position, id and target probability.
"""

from __future__ import annotations

import html
import json
from typing import Callable

from .trace import CallRow, cell_status

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 6px} h2{font-size:17px;margin:26px 0 8px}
.meta{color:#4a5263;font-size:13px;margin:2px 0} .prompt{white-space:pre-wrap;background:#f4f5f8;padding:8px;
border-radius:6px;font-size:13px;max-height:140px;overflow:auto}
.out{line-height:2.0;font-size:15px;white-space:pre-wrap}
.tok{border-radius:3px;padding:1px 1px;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
.tok.hl,.chip.hl,td.hl{outline:2px solid #1d2330}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #dde1e8;padding:3px 6px;vertical-align:top}
th{background:#f4f5f8;text-align:left}
.chip{display:inline-block;margin:1px;padding:0 4px;border-radius:3px;font-family:ui-monospace,Menlo,Consolas,monospace}
.right{background:#d8f5dc;border:1px dashed #3c9a4a} .wrong{background:#f3f3f3;color:#9aa0ab;text-decoration:line-through}
.branch{display:block} .legend span{margin-right:14px}
.grid{overflow-x:auto;max-width:100%} .grid td{padding:1px 3px;min-width:18px;max-width:70px;overflow:hidden;
white-space:nowrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px}
.grid td.empty{border-color:#f1f2f5}
"""

_JS = """
document.addEventListener('mouseover', function (e) {
  var el = e.target.closest('[data-call]');
  document.querySelectorAll('.hl').forEach(function (x) { x.classList.remove('hl'); });
  if (!el) return;
  document.querySelectorAll('[data-call="' + el.dataset.call + '"]').forEach(function (x) { x.classList.add('hl'); });
});
"""


def call_colour(call: int) -> str:
    """A light background colour per call (golden-angle hues, so neighbours differ).

    >>> call_colour(0), call_colour(1)
    ('hsl(0, 70%, 82%)', 'hsl(137, 70%, 82%)')
    """
    return f"hsl({(call * 137) % 360}, 70%, 82%)"


def token_text(tokenizer) -> Callable[[int], str]:
    """A function id -> readable token text (whitespace made visible), or the id when there is no tokenizer."""
    def show(t: int) -> str:
        if tokenizer is None:
            return str(t)
        s = tokenizer.decode([t]).replace("\n", "⏎").replace("\t", "⇥")
        return s if s.strip() else s.replace(" ", "·")
    return show


def render_html(rows: list[CallRow], final: list[int], *, tokenizer=None, title: str = "", prompt: str = "",
                meta: list[str] | None = None, data: dict | None = None) -> str:
    """The whole page as a string."""
    show = token_text(tokenizer)
    esc = html.escape

    def tip(row: CallRow, pos: int, tok: int, what: str, prob: float | None = None) -> str:
        p = "" if prob is None else f" · p={prob:.3f}"
        return esc(f"call {row.call} ({row.kind}) · position {pos} · id {tok} · {what}{p}", quote=True)

    # the output, coloured by call
    out = []
    for row in rows:
        for i, t in enumerate(row.accepted):
            prob = row.probs[i] if i < len(row.probs) else None
            out.append(f'<span class="tok" data-call="{row.call}" style="background:{call_colour(row.call)}" '
                       f'title="{tip(row, row.position + i, t, "produced", prob)}">{esc(show(t))}</span>')

    # one table row per call
    trs = []
    for row in rows:
        chips = "".join(
            f'<span class="chip" data-call="{row.call}" style="background:{call_colour(row.call)}" '
            f'title="{tip(row, row.position + i, t, "produced", row.probs[i] if i < len(row.probs) else None)}">'
            f'{esc(show(t))}</span>' for i, t in enumerate(row.accepted))
        branches = []
        for b in row.branches:
            cells = []
            for i, t in enumerate(b):
                pos = row.position + i
                cls = "right" if pos < len(final) and final[pos] == t else "wrong"
                cells.append(f'<span class="chip {cls}" title="{tip(row, pos, t, "proposed")}">{esc(show(t))}</span>')
            branches.append(f'<span class="branch">{"".join(cells)}</span>')
        if row.outputs is not None:
            outs = "".join(f'<span class="chip" title="{tip(row, row.position + i, t, "new iterate")}">'
                           f'{esc(show(t))}</span>' for i, t in enumerate(row.outputs))
            branches.append(f'<span class="branch">→ {outs}</span>')
        proposed = "".join(branches) or ('<i>synthesised from accepted lengths</i>' if row.synthetic else "—")
        trs.append(f'<tr data-call="{row.call}"><td>{row.call}</td><td>{esc(row.kind)}</td><td>{row.position}</td>'
                   f'<td>{len(row.accepted)}</td><td>{chips}</td><td>{proposed}</td></tr>')

    # trajectory grid: calls x output positions
    width = max([len(final)] + [max(cell_status(r, final), default=-1) + 1 for r in rows])
    grid = ["<tr><th>call</th>" + "".join(f"<th>{p}</th>" for p in range(width)) + "</tr>"]
    for row in rows:
        cells = cell_status(row, final)
        tds = []
        for p in range(width):
            if p not in cells:
                tds.append('<td class="empty"></td>')
                continue
            t, status = cells[p]
            style = f' style="background:{call_colour(row.call)}"' if status == "accepted" else ""
            cls = "" if status == "accepted" else f' class="{status}"'
            tds.append(f'<td{cls}{style} data-call="{row.call}" title="{tip(row, p, t, status)}">{esc(show(t))}</td>')
        grid.append(f"<tr><td>{row.call}</td>{''.join(tds)}</tr>")

    payload = json.dumps(data or {}, default=str).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
{''.join(f'<div class="meta">{esc(m)}</div>' for m in meta or [])}
<h2>Prompt</h2><div class="prompt">{esc(prompt)}</div>
<h2>Output, coloured by the call that produced each token</h2>
<div class="out" id="output">{''.join(out)}</div>
<h2>Trajectory: what each call proposed at each output position</h2>
<div class="legend meta"><span><span class="chip" style="background:{call_colour(0)}">tok</span> produced by the call
</span><span><span class="chip right">tok</span> proposed, equal to the final output</span>
<span><span class="chip wrong">tok</span> proposed, wrong</span></div>
<div class="grid"><table id="trajectory">{''.join(grid)}</table></div>
<h2>Calls</h2>
<table id="calls"><tr><th>call</th><th>kind</th><th>position</th><th>produced</th><th>tokens</th>
<th>proposed (branches; Jacobi: → new iterate)</th></tr>{''.join(trs)}</table>
<script type="application/json" id="trace-data">{payload}</script>
<script>{_JS}</script>
</body></html>
"""
