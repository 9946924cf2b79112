"""The ``run`` and ``demo`` subcommands: configuration in, daemon out.

Bad input ends here as a :class:`LobleError`, which ``loble.__main__``
prints as one line per problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
from functools import partial
from typing import Any

from prometheus_client import disable_created_metrics

from loble.config import load_config
from loble.core import Config, LobleError

from ._daemon import Daemon
from ._demo import run_backends, run_demo
from ._logging import configure_logging
from ._runtime import run, runtime_options
from ._supervisor_admin import worker_admin_socket
from ._workers import run_workers, worker_config, worker_index


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
        help="start local demo backends, the balancer and a client load",
        description="Start a demo backend on every [[backends]] address of the "
        "configuration (they must be local), the balancer, and a few requests a second "
        "through it, with the access log on. Stop with Ctrl-C.",
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
        "--rate",
        type=float,
        default=2.0,
        metavar="N",
        help="client requests a second through the balancer; 0 for none (default: 2)",
    )
    demo.add_argument(
        "--no-access-log", action="store_true", help="keep the configuration's access_log"
    )
    demo.set_defaults(handler=_demo)


def _quiet_metrics() -> None:
    # prometheus_client adds a "_created" timestamp series per counter, which
    # Prometheus scrapes as noise; this process only serves Loble's metrics.
    disable_created_metrics()  # type: ignore[no-untyped-call]


def _run(args: argparse.Namespace) -> int:
    # A hang-up reloads once the daemon watches for it; until then (start-up,
    # or a worker still starting) it must not kill the process either.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
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
    if args.rate < 0:
        raise LobleError(f"--rate: {args.rate} must be >= 0")
    config: Config = load_config(args.config)
    if not args.no_access_log:
        config = dataclasses.replace(
            config, logging=dataclasses.replace(config.logging, access_log=True)
        )
    runtime_options(config.runtime)
    _quiet_metrics()
    logger = configure_logging(config.logging)
    if args.backends_only:
        run(partial(run_backends, config, logger.getChild("demo")), config.runtime)
    else:
        run(partial(run_demo, config, logger, rate=args.rate), config.runtime)
    return 0
