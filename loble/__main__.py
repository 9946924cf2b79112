"""The ``loble`` command line.

Each subsystem registers its own subcommands (``loble.io.cli``,
``loble.sim.cli``), so this file stays a table of contents. Every command
turns a :class:`LobleError` into one line on stderr and exit status 1: a user
never sees a traceback for their own bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import tomli_w

from loble import __version__
from loble.config import load_config
from loble.core import LobleError, config_to_dict


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.path)
    effective = config_to_dict(config)
    backends = effective.pop("backends")
    print(f"# {args.path}: valid; the effective configuration, defaults filled in:")
    print(tomli_w.dumps(effective), end="")
    for backend in backends:  # as [[backends]] tables, like the file a user writes
        print(f"\n[[backends]]\n{tomli_w.dumps(backend)}", end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from loble.io.cli import register as register_io
    from loble.sim.cli import register as register_sim

    parser = argparse.ArgumentParser(
        prog="loble",
        description="An L4 TCP load balancer with a sans-I/O core.",
    )
    parser.add_argument("--version", action="version", version=f"loble {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file and print the effective configuration",
        description="Validate PATH; print the effective configuration, or every error "
        "one per line and exit 1.",
    )
    check.add_argument("path", metavar="PATH")
    check.set_defaults(handler=_check_config)
    register_io(commands)
    register_sim(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except LobleError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
