"""The `diffprune` command: a thin layer over the library. Each subcommand lives in its own module of this
package with `add_parser(subparsers)` and `run(args)`; they are discovered automatically."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys

from ..errors import DiffpruneError

# the order subcommands are listed in --help; modules not listed come after, alphabetically
ORDER = ["info", "demo", "train", "sample", "eval", "bench", "prune", "finetune", "search"]


def _commands():
    found = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffprune",
        description="Make diffusion models cheaper: structural pruning (Diff-Pruning), learned block-skipping "
                    "schedules (DiP-GO) and their baselines, on diffusers models. MODEL arguments take a zoo name "
                    "(see `diffprune info --list`) or a local diffusers model/pipeline directory.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"diffprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _commands():
        module = importlib.import_module(f"{__name__}.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def _warnings_as_messages(command: str):
    """Show warnings the library raises as one plain line each ("diffprune search: warning: ..."), not as a
    source location with code; Python's default filter already shows each one once."""
    import warnings
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    plain = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not os.path.abspath(filename).startswith(package + os.sep):
            return plain(message, category, filename, lineno, file, line)
        print(f"diffprune {command}: warning: {message}", file=file or sys.stderr)
    warnings.showwarning = show
    return plain


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    import warnings
    plain = _warnings_as_messages(args.command)
    args._claims = contextlib.ExitStack()  # outputs claimed by the command (_common.claim), released at its end
    try:
        with args._claims:
            return args._run(args) or 0
    except DiffpruneError as e:
        print(f"diffprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffprune {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = plain


if __name__ == "__main__":
    sys.exit(main())
