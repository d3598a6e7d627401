"""Decoding-trajectory visualiser: which tokens each model call proposed, kept, and how guesses converged.

    >>> result = pd.generate(model, "Hi", method="jacobi", trace=True)   # doctest: +SKIP
    >>> write_trajectory(result, "page.html", "page.png", tokenizer=model.tokenizer)  # doctest: +SKIP

Works for every method: it only reads ``DecodeResult.trace`` (and falls back
to ``stats.accepted_lengths`` when a method records no proposals).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..decoding.sink import DecodeResult
from .html import render_html
from .png import render_png
from .trace import CallRow, call_rows

__all__ = ["CallRow", "call_rows", "render_html", "render_png", "write_trajectory"]


def write_trajectory(result: DecodeResult, html_path: str, png_path: str | None = None, *, tokenizer=None,
                     method: str | None = None, options: Mapping[str, Any] | None = None,
                     prompt_text: str = "") -> list[CallRow]:
    """Write the HTML page (and the PNG when ``png_path`` is given); return the call rows drawn."""
    s = result.stats
    rows = call_rows(result.trace, result.token_ids, s.accepted_lengths)
    method = method or s.method
    opts = ", ".join(f"{k}={v}" for k, v in (options or {}).items()) or "defaults"
    title = f"paradecode trajectory — {method}"
    meta = [f"options: {opts}",
            f"{s.new_tokens} tokens · {s.model_calls} model calls (prefill included) · "
            f"{s.tokens_per_call:.2f} tokens/call · {s.tokens_per_s:.1f} tokens/s · finish: {result.finish_reason}"]
    if all(r.synthetic for r in rows):
        meta.append("this method records no proposals: one row per call, rebuilt from its accepted lengths")
    data = {"method": method, "options": dict(options or {}), "token_ids": result.token_ids,
            "stats": s.to_dict(), "trace": result.trace}
    page = render_html(rows, result.token_ids, tokenizer=tokenizer, title=title,
                       prompt=prompt_text or _decode(tokenizer, result.prompt_ids), meta=meta, data=data)
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(page)
    if png_path:
        render_png(rows, result.token_ids, png_path, title=f"{method}: {s.new_tokens} tokens in "
                   f"{s.model_calls} calls ({s.tokens_per_call:.2f} tokens/call)")
    return rows


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
