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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _commands():
        module = importlib.import_module(f"{__name__}.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
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


if __name__ == "__main__":
    sys.exit(main())
