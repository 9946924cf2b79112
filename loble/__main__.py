"""The ``loble`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import tomli_w

from loble import __version__
from loble.config import load_config
from loble.core import LobleError, config_to_dict


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
    except LobleError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1
    print(f"# {args.path}: valid; the effective configuration, defaults filled in:")
    effective = config_to_dict(config)
    backends = effective.pop("backends")
    print(tomli_w.dumps(effective))
    print(tomli_w.dumps({"backends": backends}), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loble",
        description="An L4 TCP load balancer with a sans-I/O core.",
    )
    parser.add_argument("--version", action="version", version=f"loble {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file and print the effective configuration",
    )
    check.add_argument("path", metavar="PATH")
    check.set_defaults(handler=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = args.handler
    try:
        return int(handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
