"""`paradecode methods`: the registered decoding methods and their options."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("methods", help="list decoding methods and their options")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..methods import all_methods, method_options

    methods = all_methods()
    rows = [{"name": name, "family": cls.family, "lossless": cls.lossless, "summary": cls.summary,
             "options": method_options(cls)} for name, cls in methods.items()]
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="paradecode methods (use: --method NAME -o KEY=VALUE)", show_lines=True)
    table.add_column("method", style="bold")
    table.add_column("lossless")
    table.add_column("what it does")
    table.add_column("options (default)")
    for r in rows:
        opts = "\n".join(f"{o['name']}: {o['type']} = {o['default']!r} — {o['help']}" for o in r["options"]) or "—"
        table.add_row(r["name"], "yes" if r["lossless"] else "no", r["summary"], opts)
    Console().print(table)
    return 0
