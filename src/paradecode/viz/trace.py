"""Turn a decode's trace into one row per model call, whatever the method recorded.

Methods record calls with :meth:`TokenSink.record` (``proposed``,
``accepted``, ``position`` and extras such as ``parents``, ``outputs``,
``probs``). Those records differ in shape — a Jacobi block, a token tree, a
set of candidate n-grams — so :func:`call_rows` normalises them to
:class:`CallRow` s: each call's *branches* are candidate token sequences that
start at the call's output position, aligned with the final output. Methods
that record nothing (plain decoding) get one synthetic row per call from
``stats.accepted_lengths``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..decoding.tree import path_to


@dataclass
class CallRow:
    """One model call: where it started in the output, what it proposed and produced."""

    call: int
    kind: str
    position: int                      # index in the output of the call's first produced token
    accepted: list[int]                # tokens the call produced (accepted + recovered/bonus)
    branches: list[list[int]] = field(default_factory=list)  # proposals, each starting at `position`
    probs: list[float | None] = field(default_factory=list)  # target probability per produced token
    outputs: list[int] | None = None   # Jacobi: the model's new value at every block position
    synthetic: bool = False            # True when rebuilt from accepted lengths only


def branches_of(record: dict) -> list[list[int]]:
    """Candidate sequences of a trace record, each starting at the record's position.

    A flat ``proposed`` list is one chain, or a tree when ``parents`` is
    given (one branch per leaf); a list of lists is a set of candidates.

    >>> branches_of({"proposed": [5, 6, 7], "parents": [-1, 0, -1]})
    [[5, 6], [7]]
    >>> branches_of({"proposed": [[1, 2], [3]]})
    [[1, 2], [3]]
    """
    proposed = record.get("proposed") or []
    if proposed and isinstance(proposed[0], (list, tuple)):
        return [list(b) for b in proposed if b]
    parents = record.get("parents")
    if not proposed:
        return []
    if parents is None or parents == list(range(-1, len(proposed) - 1)):
        return [list(proposed)]
    leaves = [i for i in range(len(proposed)) if i not in set(parents)]
    return [[proposed[j] for j in path_to(leaf, parents)] for leaf in leaves]


def call_rows(trace: list[dict] | None, token_ids: list[int], accepted_lengths: list[int]) -> list[CallRow]:
    """One :class:`CallRow` per model call that produced tokens.

    >>> [(r.position, r.accepted, r.synthetic) for r in call_rows(None, [4, 5, 6], [1, 2])]
    [(0, [4], True), (1, [5, 6], True)]
    >>> rows = call_rows([{"call": 0, "kind": "verify", "position": 1, "proposed": [5, 9], "accepted": [5, 6]}],
    ...                  [4, 5, 6], [1, 2])
    >>> [(r.kind, r.position, r.accepted, r.branches) for r in rows]
    [('prefill', 0, [4], []), ('verify', 1, [5, 6], [[5, 9]])]
    """
    records = [r for r in (trace or []) if r.get("accepted") is not None]
    if not records:
        return _synthetic(token_ids, accepted_lengths, 0, 0)
    rows: list[CallRow] = []
    first = int(records[0].get("position", 0))
    if first > 0:                                  # e.g. the prefill call, not recorded by the method
        rows = _synthetic(token_ids[:first], accepted_lengths, 0, 0)
    for rec in records:
        acc = [int(t) for t in rec["accepted"]]
        probs = list(rec.get("probs") or [])[:len(acc)]
        rows.append(CallRow(call=len(rows), kind=str(rec.get("kind", "call")), position=int(rec.get("position", 0)),
                            accepted=acc, branches=branches_of(rec), probs=probs + [None] * (len(acc) - len(probs)),
                            outputs=rec.get("outputs")))
    return rows


def _synthetic(token_ids: list[int], lengths: list[int], call0: int, pos0: int) -> list[CallRow]:
    rows, pos = [], pos0
    for i, n in enumerate(lengths):
        if pos >= len(token_ids):
            break
        acc = token_ids[pos:pos + n]
        rows.append(CallRow(call=call0 + i, kind="prefill" if i == 0 else "decode", position=pos, accepted=acc,
                            probs=[None] * len(acc), synthetic=True))
        pos += n
    if pos < len(token_ids):                       # lengths did not cover everything: one row for the rest
        rows.append(CallRow(call=call0 + len(rows), kind="decode", position=pos, accepted=token_ids[pos:],
                            probs=[None] * (len(token_ids) - pos), synthetic=True))
    return rows


def cell_status(row: CallRow, final: list[int]) -> dict[int, tuple[int, str]]:
    """What to draw at each output position for a call: ``{position: (token, status)}``.

    ``status`` is ``"accepted"`` for tokens the call produced, ``"right"`` for a
    proposed token equal to the final output there (a guess that had already
    converged but was not yet committed), ``"wrong"`` otherwise. The first
    branch is drawn (for Jacobi the whole block); produced tokens win.

    >>> row = CallRow(0, "jacobi", 2, accepted=[7], branches=[[7, 1, 9]])
    >>> cell_status(row, [0, 0, 7, 8, 9])
    {2: (7, 'accepted'), 3: (1, 'wrong'), 4: (9, 'right')}
    """
    cells: dict[int, tuple[int, str]] = {}
    for b in row.branches[:1]:
        for i, t in enumerate(b):
            p = row.position + i
            cells[p] = (t, "right" if p < len(final) and final[p] == t else "wrong")
    for i, t in enumerate(row.accepted):
        cells[row.position + i] = (t, "accepted")
    return dict(sorted(cells.items()))
