"""The ``paradecode`` command line.

Subcommands live in :mod:`paradecode.commands`, one module each, discovered
at start-up. Every user-caused problem is a :class:`UserError` and becomes one
line on stderr plus exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from .errors import UserError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, same shape as our own errors
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} — see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, commands

    parser = _Parser(prog="paradecode", description="Parallel decoding for language models.")
    parser.add_argument("--version", action="version", version=f"paradecode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            module = importlib.import_module(f"{commands.__name__}.{mod.name}")
            module.register(sub)
    parser.subcommands = dict(sub.choices)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    if sys.stdin is None:               # started with stdin closed (0<&-): read as empty
        sys.stdin = open(os.devnull)
    if sys.stdout is None:              # stdout closed (>&-): what would be printed goes nowhere, as asked
        sys.stdout = open(os.devnull, "w")
    try:                                # bytes that are not UTF-8 reach the prompt checks, which name them
        sys.stdin.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):
        pass
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:                           # named by the subcommand that was given, so its --help is the one shown
        sub = parser.subcommands.get(getattr(args, "command", None), parser)
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"paradecode: error: {e.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("paradecode: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:                # the system refused a read or write (a full disk, a closed device)
        where = f" ({e.filename})" if e.filename else ""
        print(f"paradecode: error: the system refused a read or write: {e.strerror or e}{where} — check the "
              "files and devices given (free space, permissions)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
