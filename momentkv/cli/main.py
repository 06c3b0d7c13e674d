"""The ``momentkv`` command: one subcommand per module listed in ``COMMAND_MODULES``.

Each module defines ``register(subparsers)``, which adds its subparser and sets ``func`` (called with the
parsed arguments; its return value is the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from momentkv import __version__

# Each entry is a module of momentkv.cli with a ``register(subparsers)`` function.
COMMAND_MODULES: tuple[str, ...] = (
    "policy_cmd",
    "demo_cmd",
    "eval_cmd",
    "bench_cmd",
    "lm_eval_cmd",
    "report_cmd",
    "tune_cmd",
    "needle_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="momentkv", description="Bounded KV cache for long generation.")
    parser.add_argument("--version", action="version", version=f"momentkv {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"momentkv.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(words)
    args.argv = words  # the command as typed, which reports print (momentkv.cli.command_line)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
