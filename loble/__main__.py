"""The ``loble`` command line.

Each subsystem registers its own subcommands (``loble.io.cli``,
``loble.io.admin_cli``, ``loble.sim.cli``), so this file stays a table of
contents. A command imports what it needs when it runs: ``loble sim`` loads
none of the daemon's dependencies (anyio and the HTTP stack), so it starts
fast and runs wherever the core does. Every command turns a
:class:`LobleError` into one line on stderr and exit status 1: a user never
sees a traceback for their own bad input, nor for a reader that closes the
output early (``loble sim ... --json | head -1``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from loble import __version__
from loble.config import load_config
from loble.core import LobleError, config_to_dict

EXIT_STDOUT_CLOSED = 128 + 13
"""The status of a command whose reader closed stdout early: 128 + SIGPIPE (13).

It is what the shell reports for ``cat`` or ``yes`` stopped the same way,
so ``set -o pipefail`` treats Loble like them, and it tells a caller the
output was cut short (an exit 0 would claim the whole report was read).
"""


def _check_config(args: argparse.Namespace) -> int:
    import tomli_w

    from loble.io._runtime import runtime_options

    config = load_config(args.path)
    runtime_options(config.runtime)  # as `loble run` does: a missing uvloop or trio fails here
    effective = config_to_dict(config)
    if effective["admin"]["token"]:
        # The token is a secret: never printed, never logged.
        effective["admin"]["token"] = "(set, not shown)"
    backends = effective.pop("backends")
    print(f"# {args.path}: valid; the effective configuration, defaults filled in:")
    print(tomli_w.dumps(effective), end="")
    for backend in backends:  # as [[backends]] tables, like the file a user writes
        print(f"\n[[backends]]\n{tomli_w.dumps(backend)}", end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from loble.io.admin_cli import register as register_admin
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
    register_admin(commands)
    register_sim(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _dispatch(argv)
        finally:
            # Flush inside the try: a closed stdout raises here, not in the
            # interpreter's final flush, which would print "Exception ignored".
            # The finally covers argparse's --help too, which exits by SystemExit.
            if sys.stdout is not None:  # None when started with fd 1 closed
                sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_STDOUT_CLOSED


def _dispatch(argv: Sequence[str] | None) -> int:
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


def _discard_stdout() -> None:
    """Point stdout at /dev/null so what is still buffered goes nowhere at exit.

    The recipe of Python's ``signal`` docs. Restoring SIGPIPE's default
    action instead would also kill the daemon when a client resets a socket.
    """
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # pragma: no cover - a stdout with no fd
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
