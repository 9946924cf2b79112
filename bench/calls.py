"""Python calls Loble makes per request and per new connection (a benchmark, not a test).

CPU time moves with the machine; the number of Python function calls the
daemon makes for one request does not. This runs ``loble run`` under
``cProfile`` twice per load, once with ``few`` and once with ``many``
requests (or connections), and divides the difference in calls by the
difference in work, so start-up, shutdown and the profiler's own calls
cancel out. Builtins (``recv_into``, ``send``, ``epoll.poll``...) count as
calls, as the profile counts them.

Loads, each against a backend in this script that answers every read at once:

* ``keepalive``: one client connection, ``N`` request/response round trips
  of 64 bytes: a wakeup per direction per request;
* ``new_conns``: ``N`` connections, each one request, the client's EOF, the
  answer, the backend's EOF.

    python bench/calls.py
    python bench/calls.py --loble-baseline /path/to/an/earlier/checkout
    python bench/calls.py --env LOBLE_DATA_PATH=tasks --runtime trio
    python bench/calls.py --loads new_conns --top 25   # and which functions make them
    python bench/calls.py --loads new_conns --by-file  # and which modules
"""

from __future__ import annotations

import argparse
import os
import pstats
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAYLOAD = b"x" * 64
START_TIMEOUT = 30.0


class Backend:
    """A selector loop in a thread: reads, answers the same bytes, closes after EOF."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ)
        while not self._stop:
            for key, _ in selector.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    try:
                        client, _ = self.listener.accept()
                    except BlockingIOError:
                        continue
                    client.setblocking(False)
                    selector.register(client, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    sock.sendall(data)
                else:
                    selector.unregister(sock)
                    sock.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.listener.close()


def keepalive(port: int, requests: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(requests):
            sock.sendall(PAYLOAD)
            got = 0
            while got < len(PAYLOAD):
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the proxy closed a keep-alive connection")
                got += len(chunk)


def new_conns(port: int, connections: int) -> None:
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(PAYLOAD)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass


LOADS = {"keepalive": keepalive, "new_conns": new_conns}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"loble exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"loble did not listen on {port} within {START_TIMEOUT} s")


Calls = dict[str, int]
"""Calls per function in one profile: ``file:line(name)`` -> count (and, under
``BY_CALLER`` + a file's name, the builtins that file's functions called)."""

BY_CALLER = "builtins called from "


def profiled_calls(
    python: str, source: Path | None, load: str, work: int, backend: int, args: argparse.Namespace
) -> Calls:
    """Calls per function in a profile of ``loble run`` that served ``work`` units of ``load``."""
    with tempfile.TemporaryDirectory(prefix="loble-calls-") as tmp:
        port = free_port()
        conf = Path(tmp) / "loble.toml"
        conf.write_text(
            f'[listener]\naddress = "127.0.0.1:{port}"\n'
            f'[runtime]\nbackend = "{args.runtime}"\n'
            "[timeouts]\nidle = 3600.0\ndrain = 5.0\n"
            '[logging]\nlevel = "warning"\n'
            f'[[backends]]\naddress = "127.0.0.1:{backend}"\n'
        )
        profile = Path(tmp) / "profile.out"
        env = dict(os.environ)
        env.update(dict(item.split("=", 1) for item in args.env))
        if source is not None:
            env["PYTHONPATH"] = str(source)
        argv = [python, "-m", "cProfile", "-o", str(profile), "-m", "loble", "run", "-c", str(conf)]
        process = subprocess.Popen(
            argv, cwd=source or tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_listening(port, process)
            LOADS[load](port, work)
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if not profile.exists():
            raise RuntimeError(f"no profile written: {err.decode(errors='replace')[-400:]}")
        stats = pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]
        calls = {
            f"{Path(file).name}:{line}({name})": int(counts[1])
            for (file, line, name), counts in stats.items()
        }
        # A builtin's calls also count under the file of each caller ("by
        # file" lists them there: the layer that made them).
        for (file, _, _), counts in stats.items():
            if file != "~":
                continue
            for (caller_file, _, _), caller_counts in counts[4].items():
                key = f"{BY_CALLER}{Path(caller_file).name}"
                calls[key] = calls.get(key, 0) + int(caller_counts[1])
        return calls


def total(calls: Calls) -> int:
    """All the calls of one profile (not the per-caller copies of builtins' counts)."""
    return sum(count for function, count in calls.items() if not function.startswith(BY_CALLER))


def by_file(few: Calls, many: Calls, units: int) -> list[tuple[str, float, float]]:
    """Per unit of work, by source file: the calls of its functions and of the
    builtins it called (``recv_into``, ``dict.get``...), most first."""
    files: dict[str, list[float]] = {}
    for function, count in many.items():
        per = (count - few.get(function, 0)) / units
        if function.startswith(BY_CALLER):
            files.setdefault(function[len(BY_CALLER) :], [0.0, 0.0])[1] += per
        elif not function.startswith("~:"):
            files.setdefault(function.split(":", 1)[0], [0.0, 0.0])[0] += per
    rows = [(where, own, builtins) for where, (own, builtins) in files.items()]
    return sorted(rows, key=lambda row: -(row[1] + row[2]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--few", type=int, default=200, help="work units of the short run (200)")
    parser.add_argument("--many", type=int, default=2200, help="work units of the long run (2200)")
    parser.add_argument(
        "--loads", default="keepalive,new_conns", help="which loads, comma-separated"
    )
    parser.add_argument("--runtime", default="asyncio", help="[runtime] backend (asyncio)")
    parser.add_argument(
        "--env", action="append", default=[], help="VAR=VALUE for loble, repeatable"
    )
    parser.add_argument(
        "--loble-python", default=sys.executable, help="python with loble installed"
    )
    parser.add_argument(
        "--loble-baseline", type=Path, help="another Loble checkout, measured the same way"
    )
    parser.add_argument(
        "--top", type=int, default=0, help="also list the N functions called most per unit"
    )
    parser.add_argument(
        "--by-file", action="store_true", help="also list the calls per unit by source file"
    )
    args = parser.parse_args(argv)
    subjects: list[tuple[str, Path | None]] = [("loble", None)]
    if args.loble_baseline is not None:
        subjects.append(("loble-base", args.loble_baseline.resolve()))
    backend = Backend()
    results: dict[tuple[str, str], float] = {}
    try:
        for load in args.loads.split(","):
            for name, source in subjects:
                few = profiled_calls(args.loble_python, source, load, args.few, backend.port, args)
                many = profiled_calls(
                    args.loble_python, source, load, args.many, backend.port, args
                )
                units = args.many - args.few
                per = (total(many) - total(few)) / units
                results[(name, load)] = per
                unit = "request" if load == "keepalive" else "connection"
                print(f"{name:10} {load:10} {per:8.1f} Python calls per {unit}", flush=True)
                if args.top:
                    each = {
                        function: (count - few.get(function, 0)) / units
                        for function, count in many.items()
                        if not function.startswith(BY_CALLER)
                    }
                    ranked = sorted(each.items(), key=lambda item: -item[1])[: args.top]
                    for function, calls in ranked:
                        print(f"    {calls:7.2f}  {function}")
                if args.by_file:
                    print("    functions + builtins they call = calls per unit, file")
                    for where, own, builtins in by_file(few, many, units):
                        if own + builtins < 0.05:
                            break
                        print(f"    {own:7.2f} + {builtins:6.2f} = {own + builtins:7.2f}  {where}")
    finally:
        backend.close()
    if args.loble_baseline is not None:
        for load in args.loads.split(","):
            now, base = results[("loble", load)], results[("loble-base", load)]
            print(f"{load}: {now:.1f} calls now, {base:.1f} at the baseline ({now / base:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
