"""CPU time each proxy spends per request under one wrk load (a benchmark, not a test).

On a two-core machine shared by ``wrk``, the backend and the proxy, a rate
depends on where the scheduler puts the three as much as on the proxy; the
CPU time the proxy spends per request does not. This runs ``wrk`` (the same
options and nginx backend as ``bench/run.py``) through each proxy in turn,
interleaved over rounds, reads the proxy's user and system time from
``/proc/PID/stat`` before and after the measured run, and prints them per
request with the rate and p99, then the medians.

Subjects: ``haproxy`` and ``loble`` as in ``bench/run.py``, and ``floor``:
``bench/floor_proxy.py``, the least Python a proxy can run per wakeup
(what any Python proxy pays before its own logic).

    python bench/cpu.py                                  # keep-alive, 3 rounds
    python bench/cpu.py --load new_conns --rounds 5
    python bench/cpu.py --only loble --env LOBLE_COPY=splice
    python bench/cpu.py --load new_conns --only loble --profile 30   # and where it goes
    python bench/cpu.py --load new_conns --loble-baseline ../loble-before  # a change, interleaved
    python bench/cpu.py --load new_conns --strace      # system calls per request, by name
    python bench/cpu.py --load new_conns --syscalls    # the same counted by perf stat
    python bench/cpu.py --load new_conns --kernel      # where the kernel's time goes

With ``--load new_conns`` it ends with Loble's budget per new connection
against issue 16's targets: Python (user) time, kernel (system) time beside
the floor's, and Python calls per connection, counted by ``bench/calls.py``
in a profile of a fixed number of connections (``--no-calls``: skip that).

``--strace`` adds one more run of each subject with ``strace -c -f``
attached for the measured part (slower: strace stops the proxy at every
system call, so only the counts mean anything) and prints each system
call's count per request, side by side. ``--syscalls`` counts the calls
that matter here with ``perf stat`` on their tracepoints instead, in the
kernel, so the processes' timing is as in the measured runs (a half-close
that a client's own close makes unneeded shows only there). It needs
``perf`` (Debian: ``linux-perf``) and tracefs mounted (as root: ``mount -t
tracefs nodev /sys/kernel/tracing``). ``--kernel`` records one more run
of each subject with ``perf record -g`` and splits its kernel time per
request by path: each system call, the receive softirq, the wakeup of a
peer blocked on a socket.

``--profile N`` adds one more run of Loble under ``cProfile`` (slower: the
profiler's own cost is in it) and lists its Python calls per request and
the N functions with the most time of their own, per request.
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _loads import run_wrk
from _procs import Registry, process_tree, raise_nofile
from _refs import INSTALL_HINT, HAProxy, Loble, Proxy, start_http_backend
from calls import Backend as EchoBackend
from calls import profiled_calls, total

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


class Floor(Proxy):
    name = "floor"
    label = "floor (bench/floor_proxy.py)"

    def argv(self, workdir: Path, port: int, backend: int, tag: str) -> list[str]:
        return [
            sys.executable,
            str(Path(__file__).with_name("floor_proxy.py")),
            str(port),
            str(backend),
        ]


class Profiled(Loble):
    """Loble under ``cProfile``, which writes its profile to ``output`` as it exits."""

    name = "loble-profiled"
    label = "Loble under cProfile"

    def __init__(self, python: str, repo: Path, output: Path) -> None:
        super().__init__(python, repo)
        self.output = output

    def _python(self) -> list[str]:
        return [self.python, "-m", "cProfile", "-o", str(self.output)]


def print_profile(output: Path, requests: int, top: int) -> None:
    """Calls per request, and the ``top`` functions by their own time, per request."""
    stats = pstats.Stats(str(output))
    table = stats.stats  # type: ignore[attr-defined]
    total = sum(counts[1] for counts in table.values())
    print(
        f"\nunder cProfile: {total / requests:.1f} Python calls per request "
        "(start-up and shutdown included)"
    )
    print("  own us/request  calls/request  function")
    ranked = sorted(table.items(), key=lambda item: -item[1][2])[:top]
    for (file, line, name), counts in ranked:
        where = f"{Path(file).name}:{line}({name})" if line else name
        print(f"  {counts[2] / requests * 1e6:14.2f}  {counts[1] / requests:13.2f}  {where}")


def measure(reg: Registry, proxy: Proxy, backend: int, tag: str, args: argparse.Namespace) -> Any:
    """One warm-up and one measured ``wrk`` run through ``proxy``: the result and its CPU."""
    running = proxy.start(reg, backend, tag)
    assert running.started is not None
    pid = running.started.pid
    wrk = {"connections": args.connections, "threads": 1, "close": args.load == "new_conns"}
    warm = run_wrk(reg, "wrk", running.port, duration=1, **wrk)
    user0, system0 = cpu_seconds(pid)
    result = run_wrk(reg, "wrk", running.port, duration=args.duration, **wrk)
    user1, system1 = cpu_seconds(pid)
    proxy.stop(reg, running)
    requests = result.get("requests", 0)
    if not requests:
        raise RuntimeError(f"{proxy.name}: wrk completed no request")
    result["all_requests"] = requests + warm.get("requests", 0)
    return result, user1 - user0, system1 - system0


SYSCALLS = [
    "accept4",
    "socket",
    "connect",
    "getpeername",
    "getsockname",
    "setsockopt",
    "getsockopt",
    "ioctl",
    "fcntl",
    "recvfrom",
    "sendto",
    "splice",
    "shutdown",
    "close",
    "epoll_ctl",
    "epoll_wait",
]
"""The system calls ``--syscalls`` counts (``perf stat`` opens a counter per call and CPU)."""

SOFTWARE = ("page-faults", "context-switches", "cpu-migrations")
"""Kernel work that is no system call, counted beside them (in parentheses; not in "all")."""


def observed(
    reg: Registry,
    proxy: Proxy,
    backend: int,
    args: argparse.Namespace,
    tool: str,
    argv: Callable[[list[int]], list[str]],
) -> int:
    """One more run of ``proxy`` under the load with ``tool`` attached for its
    measured part (``argv`` of the proxy's pids); the requests it completed.

    The tool is interrupted (SIGINT) at the end, when it writes its output.
    """
    running = proxy.start(reg, backend, f"{proxy.name}-{tool}")
    assert running.started is not None
    wrk = {"connections": args.connections, "threads": 1, "close": args.load == "new_conns"}
    run_wrk(reg, "wrk", running.port, duration=1, **wrk)
    watcher = reg.start(tool, argv(list(process_tree(running.started.pid))))
    try:
        result = run_wrk(reg, "wrk", running.port, duration=args.duration, **wrk)
    finally:
        watcher.popen.send_signal(signal.SIGINT)  # detach: the tool writes its output
        watcher.popen.wait(timeout=60)
        proxy.stop(reg, running)
    requests = int(result.get("requests", 0))
    if not requests:
        raise RuntimeError(f"{proxy.name}: wrk completed no request under {tool}")
    return requests


def traced(
    reg: Registry, proxy: Proxy, backend: int, args: argparse.Namespace, tool: str
) -> dict[str, float]:
    """System calls per request of ``proxy`` under the load, by name.

    ``tool`` is ``strace`` (``strace -c -f``: every call, but each one stops
    the proxy, so the timing between the processes changes) or ``perf``
    (``perf stat`` on the syscall tracepoints of :data:`SYSCALLS`: counted
    in the kernel, the timing as in the measured runs).
    """
    summary = reg.workdir / f"{proxy.name}.{tool}"

    def argv(pids: list[int]) -> list[str]:
        if tool == "strace":
            return ["strace", "-c", "-f", "-o", str(summary), *(f"-p{pid}" for pid in pids)]
        events = ",".join([*(f"syscalls:sys_enter_{call}" for call in SYSCALLS), *SOFTWARE])
        joined = ",".join(map(str, pids))
        return ["perf", "stat", "-x", ",", "-o", str(summary), "-e", events, "-p", joined]

    requests = observed(reg, proxy, backend, args, tool, argv)
    counts: dict[str, float] = {}
    for line in summary.read_text().splitlines():
        if tool == "perf":
            # count,unit,event,...
            fields = line.split(",")
            if len(fields) >= 3 and fields[0].isdigit():
                name = fields[2].split("sys_enter_", 1)[-1]
                counts[name if name not in SOFTWARE else f"({name})"] = int(fields[0]) / requests
            continue
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3]) / requests
    return counts


PERF_FREQUENCY = 4000
"""Samples a second of CPU that ``--kernel`` takes (each one stands for 250 us)."""

KERNEL_PATHS = (
    "net_rx_action",
    "sock_def_readable",
    *(f"__x64_sys_{call}" for call in SYSCALLS),
)
"""Where ``--kernel`` splits the kernel's time: the receive softirq, waking a
peer blocked on a socket, each system call's entry.
They overlap (a send runs the receiver's softirq on loopback)."""


def kernel_profile(
    reg: Registry, proxy: Proxy, backend: int, args: argparse.Namespace
) -> dict[str, float]:
    """Kernel CPU per request (us) of ``proxy`` on each of :data:`KERNEL_PATHS`, from
    ``perf record -g`` during one more run (callers' time included)."""
    data = reg.workdir / f"{proxy.name}.perf"

    def argv(pids: list[int]) -> list[str]:
        joined = ",".join(map(str, pids))
        frequency = str(PERF_FREQUENCY)
        return ["perf", "record", "-q", "-g", "-F", frequency, "-o", str(data), "-p", joined]

    requests = observed(reg, proxy, backend, args, "perf-record", argv)
    report = ["perf", "report", "-i", str(data), "--children", "--sort", "sym", "-g", "none", "-q"]
    lines: dict[str, str] = {}
    for columns in ("sample,sym", ""):
        fields = ["-F", columns] if columns else []  # default: children %, self %, symbol
        status, out, _ = reg.run("perf-report", [*report, *fields], timeout=300)
        if status != 0:
            raise RuntimeError(f"perf report exited with {status}")
        lines[columns] = out
    # Every sample has one symbol of its own: their sum is all the samples.
    samples = sum(int(line.split()[0]) for line in lines["sample,sym"].splitlines() if line.split())
    per_request = samples * 1e6 / PERF_FREQUENCY / requests  # us of all the CPU sampled
    costs: dict[str, float] = {}
    for line in lines[""].splitlines():
        fields = line.split()
        # share of the samples with the symbol on the stack, its own share, [k], symbol
        if len(fields) >= 4 and fields[0].endswith("%") and fields[2] == "[k]":
            costs[fields[3]] = float(fields[0][:-1]) / 100 * per_request
    return {
        path: costs.get(path, 0.0) for path in ("entry_SYSCALL_64_after_hwframe", *KERNEL_PATHS)
    }


def print_kernel(table: dict[str, dict[str, float]]) -> None:
    names = list(table)
    print(f"\nkernel CPU per request, us (perf record -g -F {PERF_FREQUENCY}, callers' included):")
    print(f"  {'':26}" + "".join(f"{name:>12}" for name in names))
    for path in next(iter(table.values())):
        row = [table[name][path] for name in names]
        if max(row) >= 0.05:
            print(f"  {path:26}" + "".join(f"{value:12.2f}" for value in row))


def print_syscalls(table: dict[str, dict[str, float]], tool: str) -> None:
    """Each system call's count per request, one column per subject."""
    names = list(table)
    calls = sorted({call for counts in table.values() for call in counts})
    calls.sort(key=lambda call: -max(counts.get(call, 0.0) for counts in table.values()))
    print(f"\nsystem calls per request ({'strace -c -f' if tool == 'strace' else 'perf stat'}):")
    print(f"  {'':18}" + "".join(f"{name:>12}" for name in names))
    for call in calls:
        row = [table[name].get(call, 0.0) for name in names]
        if max(row) >= 0.01:
            print(f"  {call:18}" + "".join(f"{value:12.2f}" for value in row))
    every = [
        sum(v for call, v in table[name].items() if not call.startswith("(")) for name in names
    ]
    print(f"  {'all':18}" + "".join(f"{value:12.2f}" for value in every))


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) seconds of *pid* and its descendants so far."""
    user = system = 0.0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / TICK
        system += int(fields[12]) / TICK
    return user, system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="haproxy,floor,loble", help="haproxy,floor,loble")
    parser.add_argument("--load", choices=("keepalive", "new_conns"), default="keepalive")
    parser.add_argument("--rounds", type=lambda text: max(1, int(text)), default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each measured run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for Loble")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="also profile Loble: N functions"
    )
    parser.add_argument(
        "--loble-baseline", type=Path, help="another Loble checkout, as subject loble-base"
    )
    parser.add_argument(
        "--strace", action="store_true", help="also count system calls per request (strace -c)"
    )
    parser.add_argument(
        "--syscalls",
        action="store_true",
        help="also count system calls per request with perf stat (timing undisturbed)",
    )
    parser.add_argument(
        "--kernel",
        action="store_true",
        help="also split the kernel's CPU per request by path (perf record)",
    )
    parser.add_argument(
        "--no-calls", action="store_true", help="new_conns: skip counting calls per connection"
    )
    args = parser.parse_args()
    needed = (
        "nginx",
        "wrk",
        *(("strace",) if args.strace else ()),
        *(("perf",) if args.syscalls or args.kernel else ()),
    )
    for tool in needed:
        if shutil.which(tool) is None:
            print(f"{tool} is missing: {INSTALL_HINT}")
            return 2
    wanted = args.only.split(",")
    loble = Loble(sys.executable, REPO)
    subjects: dict[str, Proxy] = {"haproxy": HAProxy(4000), "floor": Floor(), "loble": loble}
    if args.loble_baseline is not None:
        subjects["loble-base"] = Loble(sys.executable, REPO, args.loble_baseline.resolve())
        wanted.append("loble-base")
    proxies = []
    for proxy in (subjects[name] for name in wanted):
        reason = proxy.unavailable()
        if reason:
            print(f"skipping {proxy.name}: {reason}")
        else:
            proxies.append(proxy)
    for assignment in args.env:
        name, _, value = assignment.partition("=")
        os.environ[name] = value  # inherited by the proxies this starts
    nofile = raise_nofile(8192)
    reg = Registry(Path(tempfile.mkdtemp(prefix="loble-cpu-")))
    results: dict[str, list[tuple[float, float, float, float]]] = {p.name: [] for p in proxies}
    try:
        backend = start_http_backend(reg, "nginx", nofile)
        for round_number in range(1, args.rounds + 1):
            for proxy in proxies:
                tag = f"{proxy.name}-{round_number}"
                result, user, system = measure(reg, proxy, backend, tag, args)
                requests = result["requests"]
                row = (
                    result["requests_per_s"],
                    result.get("latency_p99_ms", float("nan")),
                    user / requests * 1e6,
                    system / requests * 1e6,
                )
                results[proxy.name].append(row)
                print(
                    f"round {round_number} {proxy.name:8} {args.load}: {row[0]:9,.0f} req/s  "
                    f"p99 {row[1]:.2f} ms  user {row[2]:5.2f} us  system {row[3]:5.2f} us  "
                    f"total {row[2] + row[3]:6.2f} us per request"
                    + (f"  WARNING: {result['warning']}" if "warning" in result else ""),
                    flush=True,
                )
        for tool in ("strace", "perf"):
            if getattr(args, "strace" if tool == "strace" else "syscalls"):
                print_syscalls(
                    {proxy.name: traced(reg, proxy, backend, args, tool) for proxy in proxies},
                    tool,
                )
        if args.kernel:
            print_kernel(
                {proxy.name: kernel_profile(reg, proxy, backend, args) for proxy in proxies}
            )
        if args.profile:
            output = reg.workdir / "loble.prof"
            # The warm-up is in the profile too: its requests count.
            profiled = Profiled(sys.executable, REPO, output)
            result, _, _ = measure(reg, profiled, backend, "profiled", args)
            print_profile(output, result["all_requests"], args.profile)
    finally:
        reg.close()
        shutil.rmtree(reg.workdir, ignore_errors=True)
    print(f"\nmedians of {args.rounds} interleaved rounds, {args.load}:")
    medians: dict[str, tuple[float, ...]] = {}
    for name, rows in results.items():
        rate, p99, user, system = medians[name] = tuple(
            statistics.median(column) for column in zip(*rows, strict=True)
        )
        print(
            f"  {name:8} {rate:9,.0f} req/s  p99 {p99:.2f} ms  user {user:5.2f} us  "
            f"system {system:5.2f} us  total {user + system:6.2f} us per request"
        )
    if "haproxy" in medians:
        for name in ("loble", "loble-base"):
            if name in medians:
                ratio = medians[name][0] / medians["haproxy"][0]
                print(f"  {name} against haproxy: {ratio:.2f}x the rate")
    if args.load == "new_conns" and "loble" in medians:
        print_budget(medians, None if args.no_calls else calls_per_connection())
    return 0


PYTHON_TARGET_US = 20.0
KERNEL_MARGIN_US = 5.0
CALLS_TARGET = 100.0


def calls_per_connection(few: int = 200, many: int = 1200) -> float:
    """Python calls per new connection: ``bench/calls.py``'s count (two profiled runs)."""
    options = argparse.Namespace(runtime="asyncio", env=[])
    backend = EchoBackend()
    try:
        counts = [
            total(profiled_calls(sys.executable, None, "new_conns", work, backend.port, options))
            for work in (few, many)
        ]
    finally:
        backend.close()
    return (counts[1] - counts[0]) / (many - few)


def print_budget(medians: dict[str, tuple[float, ...]], calls: float | None) -> None:
    """Loble's CPU per new connection against issue 16's targets."""
    _, _, user, system = medians["loble"]
    print("\nbudget per new connection (issue 16's targets):")
    verdict = "met" if user <= PYTHON_TARGET_US else f"{user - PYTHON_TARGET_US:.1f} us over"
    print(f"  Python (user)    {user:6.2f} us   target <= {PYTHON_TARGET_US:.0f} us: {verdict}")
    if "floor" in medians:
        floor = medians["floor"][3]
        bound = floor + KERNEL_MARGIN_US
        verdict = "met" if system <= bound else f"{system - bound:.1f} us over"
        print(
            f"  kernel (system)  {system:6.2f} us   target <= the floor's {floor:.2f} "
            f"+ {KERNEL_MARGIN_US:.0f} us: {verdict}"
        )
    if calls is not None:
        verdict = "met" if calls <= CALLS_TARGET else f"{calls - CALLS_TARGET:.0f} over"
        print(
            f"  Python calls     {calls:6.1f}      target <= {CALLS_TARGET:.0f}: {verdict} "
            "(bench/calls.py, connections one at a time)"
        )


if __name__ == "__main__":
    sys.exit(main())
