"""Command line: ``python -m vlmlens <command> ...``.

One registry (``common.COMMANDS``), filled by the command modules imported below, in the order
``--help`` lists them. Every user error (bad image, prompt, path, model name, setting) prints one
``error:`` line and exits with status 2; no traceback, nothing half-written.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from ..run import RunFormatError
from . import cached, experiments, maps, pruning, recovery, runs, serve
from .common import COMMANDS

#: the modules whose commands the registry holds (each registers its own on import), in --help's order
COMMAND_MODULES = (runs, experiments, pruning, maps, recovery, cached, serve)
_ORDER = {m.__name__: i for i, m in enumerate(COMMAND_MODULES)}

__all__ = ["COMMANDS", "build_parser", "main"]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``only`` the options of that one command alone (``""``: of
    none). The others are listed by name and help line; their options, some of which read the library's
    vocabularies (and so import torch), are not built."""
    parser = argparse.ArgumentParser(prog="python -m vlmlens", description="Look inside a vision-language model's layers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_) in sorted(COMMANDS.items(), key=lambda kv: _ORDER[kv[1][0].__module__]):
        p = sub.add_parser(name, help=help_, description=help_)
        if only is None or name == only:
            fn.configure(p)
        p.set_defaults(func=fn)
    return parser


def _command_in(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv=None) -> int:
    import warnings

    # transformers' deprecation notices about its own internals are not the user's business here
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    argv = sys.argv[1:] if argv is None else list(argv)
    name = _command_in(argv)
    parser = build_parser(only=name or "")
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (InputError, RunFormatError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
