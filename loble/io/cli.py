"""The ``run`` and ``demo`` subcommands: configuration in, daemon out.

Bad input ends here as a :class:`LobleError`, which ``loble.__main__``
prints as one line per problem.

Every ``loble`` command builds its parser from :func:`register`, so this
module imports nothing of the daemon's at the top: its modules (and anyio,
hypercorn, starlette, prometheus_client) are imported by the handler that
runs it, and ``loble sim`` never loads them.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from functools import partial
from typing import Any

from loble.config import load_config
from loble.core import Config, LobleError

from ._demo_defaults import BREAK_EVERY, FIRST_BREAK, LIVE_RATE, PLAIN_RATE


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``run`` and ``demo`` to the ``loble`` parser."""
    run_parser = commands.add_parser(
        "run",
        help="run the load balancer",
        description="Run the load balancer described by the configuration file until "
        "SIGTERM or SIGINT (graceful drain; a second signal stops at once).",
    )
    run_parser.add_argument(
        "-c", "--config", default="config.toml", metavar="PATH", help="default: config.toml"
    )
    run_parser.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo",
        help="start local demo backends, the balancer and clients, and watch them live",
        description="Start a demo backend on every [[backends]] address of the "
        "configuration (they must be local), the balancer and a client load. On a schedule "
        "the demo stops one backend's server and starts it again (health checks take it "
        "out and bring it back), and drains another through the admin path `loble ctl "
        "drain` uses, then sets it ready. On a terminal it draws all of it live: each "
        "backend's state, connections and traffic, the core's health transitions and "
        "snapshots, what the clients saw. With --plain, or when stdout is not a terminal, "
        "it writes the daemon's log lines instead, with the access log on. Ctrl-C (or the "
        "end of --duration) drains and exits.",
    )
    demo.add_argument(
        "-c", "--config", default="config.toml", metavar="PATH", help="default: config.toml"
    )
    demo.add_argument(
        "--backends-only",
        action="store_true",
        help="start only the backends (then run 'loble run' in another terminal)",
    )
    demo.add_argument(
        "--plain",
        action="store_true",
        help="log lines instead of the live view (the default when stdout is not a terminal)",
    )
    demo.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="N",
        help="client requests a second through the balancer; 0 for none "
        f"(default: {LIVE_RATE:g} with the live view, {PLAIN_RATE:g} with --plain)",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="drain and exit after this long (default: run until Ctrl-C)",
    )
    demo.add_argument(
        "--break-every",
        type=float,
        default=BREAK_EVERY,
        metavar="SECONDS",
        help="length of one round of the schedule (stop a server, start it, drain another, "
        f"ready it); 0: no schedule (default: {BREAK_EVERY:g})",
    )
    demo.add_argument(
        "--first-break",
        type=float,
        default=FIRST_BREAK,
        metavar="SECONDS",
        help=f"when the first round begins (default: {FIRST_BREAK:g})",
    )
    demo.add_argument(
        "--no-access-log",
        action="store_true",
        help="with --plain, keep the configuration's access_log",
    )
    demo.set_defaults(handler=_demo)


def _quiet_metrics() -> None:
    from prometheus_client import disable_created_metrics

    # prometheus_client adds a "_created" timestamp series per counter, which
    # Prometheus scrapes as noise; this process only serves Loble's metrics.
    disable_created_metrics()  # type: ignore[no-untyped-call]


def _run(args: argparse.Namespace) -> int:
    # A hang-up reloads once the daemon watches for it; until then (start-up,
    # or a worker still starting) it must not kill the process either.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from ._daemon import Daemon
    from ._logging import configure_logging
    from ._runtime import run, runtime_options
    from ._supervisor_admin import worker_admin_socket
    from ._workers import run_workers, worker_config, worker_index

    config = load_config(args.config)
    _quiet_metrics()
    runtime_options(config.runtime)  # a missing runtime fails before any socket opens
    index = worker_index()
    logger = configure_logging(config.logging, worker=index)
    if index is None and config.runtime.workers > 1:
        return run_workers(config, args.config, logger)
    path = args.config

    def reload_from() -> Config:
        fresh = load_config(path)
        return fresh if index is None else worker_config(fresh, index)

    if index is not None:
        config = worker_config(config, index)
    daemon = Daemon(
        config,
        logger=logger,
        reuse_port=index is not None,
        worker=index,
        reload_from=reload_from,
        # A worker serves its admin API on the socket its supervisor bound for it.
        admin_socket=worker_admin_socket() if index is not None else None,
    )
    run(daemon.run, config.runtime)
    return 0


def _demo(args: argparse.Namespace) -> int:
    for option in ("rate", "duration", "break_every", "first_break"):
        value = getattr(args, option)
        if value is not None and not value >= 0:  # NaN too
            raise LobleError(f"--{option.replace('_', '-')}: {value} must be >= 0")
    from ._demo import DemoOptions, run_backends, run_demo
    from ._logging import configure_logging
    from ._runtime import run, runtime_options

    live = not args.plain and not args.backends_only and sys.stdout.isatty()
    config: Config = load_config(args.config)
    if live:
        # The view shows what the log lines would: only errors go above it.
        logging_config = dataclasses.replace(config.logging, level="error", access_log=False)
    elif not args.no_access_log:
        logging_config = dataclasses.replace(config.logging, access_log=True)
    else:
        logging_config = config.logging
    config = dataclasses.replace(config, logging=logging_config)
    runtime_options(config.runtime)
    _quiet_metrics()
    logger = configure_logging(config.logging)
    if args.backends_only:
        run(partial(run_backends, config, logger.getChild("demo")), config.runtime)
        return 0
    options = DemoOptions(
        rate=args.rate if args.rate is not None else (LIVE_RATE if live else PLAIN_RATE),
        live=live,
        duration=args.duration,
        break_every=args.break_every,
        first_break=args.first_break,
    )
    run(partial(run_demo, config, logger, options), config.runtime)
    return 0
