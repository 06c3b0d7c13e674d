"""``momentkv validate FILE...``, ``momentkv policies`` and ``momentkv show NAME``: the policy language's commands."""

from __future__ import annotations

import argparse
import sys

from momentkv.cli.imports import add_import_option
from momentkv.errors import PolicyError
from momentkv.policy import builtin_policy_names, dump_policy, load_policy, summarize
from momentkv.user_modules import import_modules


def _imported(command: str, args: argparse.Namespace) -> bool:
    """Import the ``--import`` modules; False (after a message) when one fails."""
    problem = import_modules(args.imports)
    if problem:
        print(f"momentkv {command}: {problem}", file=sys.stderr)
    return problem is None


def validate(args: argparse.Namespace) -> int:
    """Exit 0 with one summary line per valid file; exit 1 with every problem of every invalid file; exit 2
    when an ``--import`` module fails."""
    if not _imported("validate", args):
        return 2
    failed = False
    for source in args.files:
        try:
            policy = load_policy(source)
        except PolicyError as err:
            failed = True
            for problem in err.problems:
                print(problem, file=sys.stderr)
            continue
        print(f"{source}: ok: {summarize(policy)}")
    return 1 if failed else 0


def policies(args: argparse.Namespace) -> int:
    """One line per built-in policy: its name and description."""
    names = builtin_policy_names()
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:<{width}}  {load_policy(name).description}")
    return 0


def show(args: argparse.Namespace) -> int:
    """The resolved policy (``extends`` applied, defaults written) as YAML."""
    if not _imported("show", args):
        return 2
    try:
        policy = load_policy(args.name)
    except PolicyError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        return 1
    sys.stdout.write(dump_policy(policy))
    return 0


def register(subparsers) -> None:
    cmd = subparsers.add_parser(
        "validate", help="check policy files; print a summary or every error",
        description="Check policy files (or built-in names): one summary line per valid file; every problem of "
        "an invalid file with its line and field. Exit status 0 when all are valid, 1 when one is not, 2 when an "
        "--import module fails.")
    cmd.add_argument("files", nargs="+", metavar="FILE", help="policy YAML files or built-in names")
    add_import_option(cmd)
    cmd.set_defaults(func=validate)
    cmd = subparsers.add_parser(
        "policies", help="list the built-in policies",
        description="List the built-in policies, one line each: the name (usable anywhere a policy is taken, "
        "with or without .yaml) and its description.")
    cmd.set_defaults(func=policies)
    cmd = subparsers.add_parser(
        "show", help="print a policy resolved (extends applied) as YAML",
        description="Print a policy resolved as YAML: extends applied and every default written, as "
        "momentkv.patch() will use it. Exit status 1 for an invalid policy, 2 when an --import module fails.")
    cmd.add_argument("name", metavar="NAME", help="a built-in name or a policy file")
    add_import_option(cmd)
    cmd.set_defaults(func=show)
