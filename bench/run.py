"""Loble's benchmark: the same loads through Loble and the reference L4 proxies, side by side.

What it measures, for each proxy (and for "direct", no proxy, the ceiling):

* bulk throughput, 1 and 8 streams: ``iperf3 -c -J [-P 8]`` through the proxy to
  an iperf3 server; Gbit/s seen by the receiver;
* new connections per second: ``wrk -H "Connection: close"``, 32 connections,
  to nginx serving a 6-byte body, so every request is a new proxied connection;
* keep-alive requests per second and p99 latency: ``wrk --latency``, 32
  persistent connections, same nginx;
* memory per idle proxied connection: 5,000 client connections opened through
  the proxy to a backend that holds them idle (``_holder.py``); the growth of
  the proxy's RSS (VmRSS summed over its processes) divided by 5,000.

How: the backends start once; every proxy is started fresh from a generated
config for every single load, on its own loopback port picked by the OS, and
stopped after it. Rounds are interleaved (round 1 runs every load, each
through every proxy back to back, then round 2, ...; the proxy order rotates
each round) so a slow spell of a shared machine spreads over all proxies
instead of landing on one, and the figures a ratio compares are seconds apart. The table shows the
median over rounds and its ratio to HAProxy; the raw results go to JSON, the
medians to a PNG plot (when matplotlib is installed) under bench/results/scratch.

Every process started is killed at the end, on an exception and on Ctrl-C;
every load is bounded in time. Missing tools are skipped with a note saying how
to install them. Usage: ``python bench/run.py [--quick] [--rounds N]
[--duration S] [--only haproxy,loble,keepalive,...]``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from _loads import LOADS, idle_rss, run_iperf, run_wrk
from _procs import Registry, process_tree, raise_nofile
from _refs import (
    INSTALL_HINT,
    PROXY_NAMES,
    Backends,
    Proxy,
    make_proxies,
    start_holder,
    start_http_backend,
    start_iperf_server,
    tool_version,
)
from rich.console import Console
from rich.table import Table

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
NOFILE_WANTED = 65536


@dataclass(frozen=True)
class Metric:
    key: str
    load: str
    field: str
    title: str
    unit: str
    scale: float
    digits: int
    lower_is_better: bool = False


METRICS = (
    Metric("bulk1", "bulk1", "gbit_per_s", "bulk, 1 stream", "Gbit/s", 1.0, 1),
    Metric("bulk8", "bulk8", "gbit_per_s", "bulk, 8 streams", "Gbit/s", 1.0, 1),
    Metric("new_conns", "new_conns", "requests_per_s", "new conns/s", "conn/s", 1.0, 0),
    Metric("keepalive", "keepalive", "requests_per_s", "keep-alive req/s", "req/s", 1.0, 0),
    Metric("keepalive_p99", "keepalive", "latency_p99_ms", "keep-alive p99", "ms", 1.0, 2, True),
    Metric("idle_rss", "idle_rss", "bytes_per_conn", "RSS / idle conn", "KiB", 1 / 1024, 1, True),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark Loble against HAProxy, nginx stream and pproxy on loopback.",
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (5)")
    parser.add_argument(
        "--duration", type=int, default=None, help="seconds per iperf3/wrk load (5)"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated proxies ("
        + ",".join(PROXY_NAMES)
        + ") and/or loads ("
        + ",".join(LOADS)
        + ") to run; default: all",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 round, 2 s loads: a smoke run in ~2 minutes"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument(
        "--idle-conns", type=int, default=5000, help="connections held for the RSS test (5000)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="seconds of wrk warm-up before each wrk load (1)"
    )
    parser.add_argument(
        "--out", type=Path, default=BENCH / "results" / "scratch", help="where JSON and PNG go"
    )
    parser.add_argument("--markdown", type=Path, help="also write the medians table here")
    parser.add_argument(
        "--loble-python",
        default=sys.executable,
        help="python that has loble installed (default: this one)",
    )
    parser.add_argument(
        "--loble-baseline",
        type=Path,
        help="another Loble checkout (e.g. a git worktree of an earlier commit) to run "
        "beside this one as 'loble-base', interleaved: a change measured before and after",
    )
    parser.add_argument(
        "--pproxy-venv", type=Path, default=BENCH / ".venv-pproxy", help="pproxy's own venv"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep generated configs and process logs"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 5)
    args.duration = args.duration if args.duration is not None else (2 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else 1
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROXY_NAMES and n not in LOADS]
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; known: {PROXY_NAMES + LOADS}")
    if args.rounds < 1 or args.duration < 1 or args.idle_conns < 1:
        parser.error("--rounds, --duration and --idle-conns must be >= 1")
    args.proxies = tuple(n for n in PROXY_NAMES if n in names) or PROXY_NAMES
    args.loads = tuple(n for n in LOADS if n in names) or LOADS
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def _tree_jiffies() -> int:
    """CPU time (utime + stime, in clock ticks) of this process and everything it started."""
    total = 0
    for pid in process_tree(os.getpid()):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def others_busy(seconds: float) -> float:
    """Share of all CPUs used by processes this script did not start, over *seconds*.

    Sampled between loads (proxies stopped, backends idle): /proc/stat's busy
    time minus the CPU time of this script's own process tree.
    """

    def sample() -> tuple[int, int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle, _tree_jiffies()

    try:
        total0, idle0, ours0 = sample()
        time.sleep(seconds)
        total1, idle1, ours1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    total = total1 - total0
    if total <= 0:
        return float("nan")
    busy = total - (idle1 - idle0) - (ours1 - ours0)
    return min(1.0, max(0.0, busy / total))


def repo_state() -> dict[str, Any]:
    """The commit measured, and whether loble/ had uncommitted changes (it moves under us)."""

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(
                ["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "loble_dirty": bool(git("status", "--porcelain", "--", "loble")),
    }


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


class Bench:
    """One benchmark run: backends, proxies, records."""

    def __init__(self, args: argparse.Namespace, reg: Registry, console: Console) -> None:
        self.args = args
        self.reg = reg
        self.console = console
        self.tools = {name: shutil.which(name) for name in ("nginx", "iperf3", "wrk")}
        self.notes: list[str] = []
        self.records: list[dict[str, Any]] = []
        self.backends = Backends()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.console.print(f"[yellow]note:[/] {text}")

    def needs(self, load: str) -> list[str]:
        return {
            "bulk1": ["iperf3"],
            "bulk8": ["iperf3"],
            "new_conns": ["wrk", "nginx"],
            "keepalive": ["wrk", "nginx"],
            "idle_rss": [],
        }[load]

    def plan_loads(self) -> list[str]:
        loads = []
        for load in self.args.loads:
            missing = [tool for tool in self.needs(load) if not self.tools[tool]]
            if missing:
                self.note(
                    f"skipping {load}: {', '.join(missing)} not found; install: {INSTALL_HINT}"
                )
            else:
                loads.append(load)
        return loads

    def start_backends(self, loads: list[str], nofile: int) -> None:
        if {"new_conns", "keepalive"} & set(loads):
            assert self.tools["nginx"]
            self.backends.http_port = start_http_backend(self.reg, self.tools["nginx"], nofile)
        if {"bulk1", "bulk8"} & set(loads):
            assert self.tools["iperf3"]
            self.backends.iperf, self.backends.iperf_port = start_iperf_server(
                self.reg, self.tools["iperf3"]
            )
        if "idle_rss" in loads:
            self.backends.holder = start_holder(self.reg)

    def target(self, load: str) -> int:
        if load in ("bulk1", "bulk8"):
            port = self.backends.iperf_port
        elif load == "idle_rss":
            port = self.backends.holder.port if self.backends.holder else None
        else:
            port = self.backends.http_port
        assert port is not None
        return port

    def run_load(self, proxy: Proxy, load: str, round_no: int) -> dict[str, Any]:
        args = self.args
        running = proxy.start(self.reg, self.target(load), f"r{round_no}-{load}")
        try:
            if load in ("bulk1", "bulk8"):
                assert self.tools["iperf3"]
                streams = 1 if load == "bulk1" else 8
                return run_iperf(
                    self.reg, self.tools["iperf3"], running.port,
                    duration=args.duration, streams=streams,
                )  # fmt: skip
            if load in ("new_conns", "keepalive"):
                assert self.tools["wrk"]
                close = load == "new_conns"
                common = {
                    "connections": args.connections, "threads": args.wrk_threads, "close": close
                }  # fmt: skip
                if args.warmup > 0:
                    with contextlib.suppress(RuntimeError, ValueError):
                        run_wrk(
                            self.reg, self.tools["wrk"], running.port,
                            duration=args.warmup, **common,
                        )  # fmt: skip
                return run_wrk(
                    self.reg, self.tools["wrk"], running.port, duration=args.duration, **common
                )
            assert self.backends.holder is not None and running.started is not None
            return idle_rss(
                self.backends.holder, running.started.pid, running.port,
                connections=args.idle_conns,
            )  # fmt: skip
        finally:
            proxy.stop(self.reg, running)

    def run(self, proxies: list[Proxy], loads: list[str]) -> None:
        for round_no in range(1, self.args.rounds + 1):
            shift = (round_no - 1) % len(proxies)
            order = proxies[shift:] + proxies[:shift]
            self.console.rule(f"round {round_no}/{self.args.rounds}  (load avg {loadavg()})")
            # Each load runs through every proxy back to back: the loads of
            # one ratio are seconds apart, not minutes, on a machine whose
            # speed drifts from minute to minute.
            for load in loads:
                for proxy in order:
                    if load == "idle_rss" and proxy.name == "direct":
                        continue  # no proxy process to measure
                    self.one(proxy, load, round_no)

    def one(self, proxy: Proxy, load: str, round_no: int) -> None:
        record: dict[str, Any] = {
            "round": round_no,
            "proxy": proxy.name,
            "load": load,
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "loadavg_before": loadavg(),
            "others_cpu_busy": round(others_busy(0.5), 3),
        }
        began = time.monotonic()
        try:
            record["result"] = self.run_load(proxy, load, round_no)
            record["ok"] = True
        except (RuntimeError, ValueError, OSError, KeyError) as error:
            record["ok"] = False
            record["error"] = f"{type(error).__name__}: {error}"
        if not record["ok"] and load.startswith("bulk") and self.backends.iperf is not None:
            # A test that failed half-way can leave the server busy: start a fresh one.
            assert self.tools["iperf3"]
            self.reg.stop(self.backends.iperf)
            self.backends.iperf, self.backends.iperf_port = start_iperf_server(
                self.reg, self.tools["iperf3"]
            )
        record["wall_s"] = round(time.monotonic() - began, 2)
        self.records.append(record)
        self.console.print(
            f"  {proxy.name:10} {load:10} {summary(record)}"
            f"  [dim](others busy {record['others_cpu_busy']:.0%} before)[/]"
        )

    def medians(self) -> dict[str, dict[str, dict[str, Any]]]:
        table: dict[str, dict[str, dict[str, Any]]] = {}
        for metric in METRICS:
            for record in self.records:
                if record["load"] != metric.load or not record["ok"]:
                    continue
                value = record["result"].get(metric.field)
                if value is None:
                    continue
                entry = table.setdefault(record["proxy"], {}).setdefault(metric.key, {"values": []})
                entry["values"].append(value * metric.scale)
        for per_metric in table.values():
            for entry in per_metric.values():
                entry["median"] = statistics.median(entry["values"])
                entry["n"] = len(entry["values"])
        return table


def background(records: list[dict[str, Any]]) -> dict[str, float]:
    """Median and max of the CPU share other processes used, sampled before each load."""
    samples = [
        r["others_cpu_busy"] for r in records if r["others_cpu_busy"] == r["others_cpu_busy"]
    ]
    if not samples:
        return {}
    return {"median": statistics.median(samples), "max": max(samples), "samples": len(samples)}


def summary(record: dict[str, Any]) -> str:
    if not record["ok"]:
        return f"[red]failed[/]: {record['error'][:300]}"
    result = record["result"]
    load = record["load"]
    if load.startswith("bulk"):
        text = f"{result['gbit_per_s']:.2f} Gbit/s"
    elif load == "idle_rss":
        text = (
            f"{result['bytes_per_conn'] / 1024:.2f} KiB/conn "
            f"(RSS {result['rss_before_kib']} -> {result['rss_after_kib']} KiB)"
        )
    else:
        text = (
            f"{result['requests_per_s']:,.0f} req/s, "
            f"p50 {result.get('latency_p50_ms', float('nan')):.2f} ms, "
            f"p99 {result.get('latency_p99_ms', float('nan')):.2f} ms"
        )
    if result.get("warning"):
        text += f" [yellow]({result['warning']})[/]"
    return text


def fmt(metric: Metric, value: float) -> str:
    return f"{value:,.{metric.digits}f}"


def cells(
    metric: Metric, medians: dict[str, dict[str, dict[str, Any]]], proxy: str
) -> tuple[str, str]:
    """(median, ratio to HAProxy) for one cell, '-' where missing."""
    entry = medians.get(proxy, {}).get(metric.key)
    if entry is None:
        return "-", ""
    base = medians.get("haproxy", {}).get(metric.key)
    ratio = f"{entry['median'] / base['median']:.2f}x" if base and base["median"] else ""
    return fmt(metric, entry["median"]), ratio


def render_table(
    console: Console,
    proxies: list[Proxy],
    metrics: list[Metric],
    medians: dict[str, Any],
    rounds: int,
) -> None:
    table = Table(
        title=f"Medians of {rounds} round(s); (x) is the ratio to HAProxy",
        caption="For p99 latency and RSS lower is better; for the rest higher is better.",
    )
    table.add_column("proxy")
    for metric in metrics:
        table.add_column(f"{metric.title}\n{metric.unit}", justify="right")
    for proxy in proxies:
        row = [proxy.name]
        for metric in metrics:
            value, ratio = cells(metric, medians, proxy.name)
            row.append(f"{value} ({ratio})" if ratio else value)
        table.add_row(*row)
    console.print(table)


def markdown_table(proxies: list[Proxy], metrics: list[Metric], medians: dict[str, Any]) -> str:
    header = "| proxy | " + " | ".join(f"{m.title} ({m.unit})" for m in metrics) + " |"
    lines = [header, "|---|" + "---:|" * len(metrics)]
    for proxy in proxies:
        row = []
        for metric in metrics:
            value, ratio = cells(metric, medians, proxy.name)
            row.append(f"{value} ({ratio})" if ratio else value)
        lines.append(f"| {proxy.label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def markdown_ranges(proxies: list[Proxy], metrics: list[Metric], medians: dict[str, Any]) -> str:
    """The lowest and highest round of each median: how much the machine moved."""
    header = "| proxy | " + " | ".join(f"{m.title} ({m.unit})" for m in metrics) + " |"
    lines = [header, "|---|" + "---:|" * len(metrics)]
    for proxy in proxies:
        row = []
        for metric in metrics:
            values = medians.get(proxy.name, {}).get(metric.key, {}).get("values")
            row.append(
                f"{fmt(metric, min(values))} - {fmt(metric, max(values))}" if values else "-"
            )
        lines.append(f"| {proxy.label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(
    path: Path,
    proxies: list[Proxy],
    metrics: list[Metric],
    medians: dict[str, Any],
    rounds: int,
) -> str | None:
    """Bars of the medians with each round as a dot; None when done, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for unused in list(axes.flat)[len(metrics) :]:
        unused.set_visible(False)
    names = [p.name for p in proxies]
    for axis, metric in zip(axes.flat, metrics, strict=False):
        values = [medians.get(n, {}).get(metric.key, {}).get("median", 0.0) for n in names]
        axis.bar(names, values, color="#4c72b0")
        for index, name in enumerate(names):
            points = medians.get(name, {}).get(metric.key, {}).get("values", [])
            axis.plot([index] * len(points), points, "o", color="#dd8452", markersize=4)
        better = "lower is better" if metric.lower_is_better else "higher is better"
        axis.set_title(f"{metric.title} ({metric.unit}), {better}", fontsize=10)
        axis.tick_params(axis="x", labelrotation=30)
    figure.suptitle(f"Loble benchmark: bars are medians of {rounds} round(s), dots the rounds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=120)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    nofile = raise_nofile(NOFILE_WANTED)
    # The proxy holds two descriptors per idle connection, plus slack.
    limit_conns = (nofile - 200) // 2
    if args.idle_conns > limit_conns:
        console.print(
            f"[yellow]note:[/] RLIMIT_NOFILE is {nofile}: idle connections lowered "
            f"from {args.idle_conns} to {limit_conns}"
        )
        args.idle_conns = limit_conns
    haproxy_maxconn = max(args.idle_conns + 1000, 2 * args.connections)
    workdir = Path(tempfile.mkdtemp(prefix="loble-bench-"))
    reg = Registry(workdir)
    started_at = dt.datetime.now()
    repo_at_start = repo_state()
    bench = Bench(args, reg, console)
    failed = True
    try:
        loads = bench.plan_loads()
        all_proxies = make_proxies(
            nofile=nofile,
            haproxy_maxconn=haproxy_maxconn,
            pproxy_venv=args.pproxy_venv,
            loble_python=args.loble_python,
            repo=REPO,
            wanted=args.proxies,
            loble_baseline=args.loble_baseline.resolve() if args.loble_baseline else None,
        )
        proxies: list[Proxy] = []
        versions: dict[str, str] = {}
        for proxy in all_proxies:
            reason = proxy.unavailable()
            if reason:
                bench.note(f"skipping {proxy.name}: {reason}")
            else:
                proxies.append(proxy)
                versions[proxy.name] = proxy.version()
        for tool in ("nginx", "iperf3", "wrk"):
            path = bench.tools[tool]
            if path:
                versions[f"tool:{tool}"] = tool_version([path, "-v"])
        if not proxies or not loads:
            console.print("[red]nothing to run[/]")
            return 1
        if "haproxy" not in [p.name for p in proxies]:
            bench.note("HAProxy is not measured: the ratios column stays empty")
        bench.start_backends(loads, nofile)
        console.print(
            f"backends: http={bench.backends.http_port} iperf3={bench.backends.iperf_port} "
            f"holder={bench.backends.holder.port if bench.backends.holder else None}; "
            f"RLIMIT_NOFILE={nofile}; logs in {workdir}"
        )
        bench.run(proxies, loads)
        failed = False
    except KeyboardInterrupt:
        console.print("[red]interrupted: stopping every process started[/]")
        return 130
    finally:
        reg.close()
        if failed or args.keep_workdir:
            console.print(f"configs and process logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    medians = bench.medians()
    metrics = [m for m in METRICS if m.load in loads]
    render_table(console, proxies, metrics, medians, args.rounds)
    if any(proxy.name == "loble-base" for proxy in proxies):
        console.print(baseline_line(metrics, medians))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = started_at.strftime("%Y%m%d-%H%M%S")
    report = {
        "started": started_at.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "repo": {"start": repo_at_start, "end": repo_state()},
        "loadavg_end": loadavg(),
        "others_cpu_busy": background(bench.records),
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "wrk_connections": args.connections,
            "wrk_threads": args.wrk_threads,
            "idle_connections": args.idle_conns,
            "haproxy_maxconn": haproxy_maxconn,
            "rlimit_nofile": nofile,
        },
        "versions": versions,
        "notes": bench.notes,
        "medians": medians,
        "records": bench.records,
    }
    json_path = args.out / f"run-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"raw results: {json_path}")
    if not args.no_plot:
        png = args.out / f"run-{stamp}.png"
        why_not = plot(png, proxies, metrics, medians, args.rounds)
        console.print(f"[yellow]note:[/] {why_not}" if why_not else f"plot: {png}")
    if args.markdown:
        write_markdown(args.markdown, report, proxies, metrics, medians)
        console.print(f"markdown table: {args.markdown}")
    failures = [r for r in bench.records if not r["ok"]]
    if failures:
        console.print(f"[yellow]{len(failures)} load(s) failed; see 'error' in the JSON[/]")
    return 0


def baseline_line(metrics: list[Metric], medians: dict[str, Any]) -> str:
    """Loble's medians as a ratio to the baseline checkout's, metric by metric."""
    parts = []
    for metric in metrics:
        now = medians.get("loble", {}).get(metric.key)
        base = medians.get("loble-base", {}).get(metric.key)
        if now and base and base["median"]:
            parts.append(f"{metric.title} {now['median'] / base['median']:.2f}x")
    return "Loble / baseline: " + (", ".join(parts) if parts else "-")


def background_line(busy: dict[str, float]) -> str:
    if not busy:
        return "Background CPU use was not sampled."
    return (
        f"CPU used by processes other than the benchmark's, sampled for 0.5 s before each of the "
        f"{busy['samples']:.0f} loads: median {busy['median']:.0%}, max {busy['max']:.0%} "
        "of the machine."
    )


def write_markdown(
    path: Path,
    report: dict[str, Any],
    proxies: list[Proxy],
    metrics: list[Metric],
    medians: dict[str, Any],
) -> None:
    machine = report["machine"]
    settings = report["settings"]
    lines = [
        "# Benchmark results",
        "",
        f"Run {report['started']} to {report['finished']} with `python bench/run.py "
        f"{report['command'].split(' ', 1)[1] if ' ' in report['command'] else ''}`.",
        "",
        f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB, kernel {machine['kernel']}, Python {machine['python']}.",
        "",
        f"Medians of {settings['rounds']} interleaved rounds, {settings['duration_s']} s per "
        f"iperf3/wrk load, wrk {settings['wrk_connections']} connections / "
        f"{settings['wrk_threads']} thread(s), {settings['idle_connections']} idle connections; "
        "(x) is the ratio to HAProxy. For p99 latency and RSS lower is better.",
        "",
        markdown_table(proxies, metrics, medians),
        *(
            [baseline_line(metrics, medians), ""]
            if any(proxy.name == "loble-base" for proxy in proxies)
            else []
        ),
        background_line(report["others_cpu_busy"]),
        "",
        "Lowest - highest round:",
        "",
        markdown_ranges(proxies, metrics, medians),
        "Versions: " + "; ".join(f"{k}: {v}" for k, v in report["versions"].items() if v) + ".",
        "",
    ]
    if report["notes"]:
        lines += ["Notes from the run:", ""] + [f"- {note}" for note in report["notes"]] + [""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
