"""A static PNG of a decoding trajectory (matplotlib, Agg backend).

Top: the trajectory grid, one row per call, one column per output position —
cells the call produced in the call's colour, proposed tokens that equal the
final output in green, wrong ones in grey. Bottom: tokens produced per call.
"""

from __future__ import annotations

import colorsys

from .trace import CallRow, cell_status


def _rgb(call: int, light: float = 0.82) -> tuple[float, float, float]:
    """The same hue as :func:`paradecode.viz.html.call_colour`, as an RGB triple."""
    return colorsys.hls_to_rgb(((call * 137) % 360) / 360, light, 0.70)


def render_png(rows: list[CallRow], final: list[int], path: str, *, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    width = max([len(final), 1] + [max(cell_status(r, final), default=-1) + 1 for r in rows])
    n = max(1, len(rows))
    fig_h = min(14.0, 2.5 + 0.18 * n)
    fig, (ax, bars) = plt.subplots(2, 1, figsize=(min(18.0, 4 + 0.14 * width), fig_h + 1.5),
                                   gridspec_kw={"height_ratios": [max(2.0, fig_h - 1.5), 1.5]})
    for r, row in enumerate(rows):
        for p, (_, status) in cell_status(row, final).items():
            colour = _rgb(row.call, 0.6) if status == "accepted" else ("#7fd18b" if status == "right" else "#d5d7dc")
            ax.add_patch(Rectangle((p, r), 1, 1, facecolor=colour, edgecolor="white", linewidth=0.4))
    ax.set_xlim(0, width)
    ax.set_ylim(n, 0)
    ax.set_xlabel("output position")
    ax.set_ylabel("model call")
    ax.set_title(title or "decoding trajectory")
    ax.legend(handles=[Rectangle((0, 0), 1, 1, color=_rgb(1, 0.6), label="produced by the call"),
                       Rectangle((0, 0), 1, 1, color="#7fd18b", label="proposed, right"),
                       Rectangle((0, 0), 1, 1, color="#d5d7dc", label="proposed, wrong")],
              loc="upper right", fontsize=8, framealpha=0.9)
    bars.bar([r.call for r in rows], [len(r.accepted) for r in rows],
             color=[_rgb(r.call, 0.6) for r in rows], width=0.9)
    bars.set_xlabel("model call")
    bars.set_ylabel("tokens produced")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
