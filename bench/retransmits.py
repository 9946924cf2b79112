"""Where TCP retransmits come from on a bulk transfer through a proxy on loopback.

Issue 12 saw 400-1,800 retransmits per 8 s ``iperf3 -P 8`` run through
Loble's splice copy, against 63 with ``recv_into`` and 3 direct. This
measures, for each subject, interleaved over rounds:

* Gbit/s and the retransmits iperf3's client sockets report;
* machine-wide TCP counters over the run (``/proc/net/snmp`` and
  ``/proc/net/netstat``): every retransmitted segment (``RetransSegs``), tail
  loss probes fired (``TCPLossProbes``), and segments the receiver reported
  as duplicates (``TCPDSACKRecvSegs``): a retransmit whose original had
  arrived, so a spurious one.

Subjects: direct (no proxy), HAProxy without and with ``option splice-*``,
Loble with ``LOBLE_COPY`` = ``recv_into``, ``splice`` and ``auto``.

The counters are the whole machine's: run it on a quiet machine (under
``flock -x /tmp/loble-bench.lock``); ``--no-tlp`` repeats the splice
subjects with ``net.ipv4.tcp_early_retrans=0`` (tail loss probes off; root
only, restored at the end) to show how many retransmits are probes.

Usage: ``python bench/retransmits.py [--rounds N] [--duration S] [--streams P]
[--no-tlp] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _loads import run_iperf
from _procs import Registry
from _refs import INSTALL_HINT, Direct, HAProxy, Loble, Proxy, start_iperf_server

REPO = Path(__file__).resolve().parent.parent
COUNTERS = {
    ("Tcp", "RetransSegs"): "retrans_segs",
    ("TcpExt", "TCPLossProbes"): "loss_probes",
    ("TcpExt", "TCPDSACKRecvSegs"): "dsack_segs",
    ("TcpExt", "TCPFastRetrans"): "fast_retrans",
    ("TcpExt", "TCPTimeouts"): "timeouts",
}
EARLY_RETRANS = Path("/proc/sys/net/ipv4/tcp_early_retrans")


def read_counters() -> dict[str, int]:
    """The counters of :data:`COUNTERS`, now."""
    found: dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = Path(path).read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            group, _, header = names.partition(":")
            for name, value in zip(header.split(), values.partition(":")[2].split(), strict=True):
                key = COUNTERS.get((group, name))
                if key is not None:
                    found[key] = int(value)
    return found


def loble(copy: str) -> Proxy:
    subject = Loble(sys.executable, REPO)
    subject.name = f"loble-{copy}"
    subject.label = f"Loble (LOBLE_COPY={copy})"
    subject.env = {"LOBLE_COPY": copy}
    return subject


@contextlib.contextmanager
def early_retrans(value: str) -> Iterator[None]:
    before = EARLY_RETRANS.read_text().strip()
    EARLY_RETRANS.write_text(value)
    try:
        yield
    finally:
        EARLY_RETRANS.write_text(before)


def measure(reg: Registry, subject: Proxy, iperf3: str, backend: int, args: Any) -> dict[str, Any]:
    running = subject.start(reg, backend, "bulk")
    try:
        before = read_counters()
        result = run_iperf(reg, iperf3, running.port, duration=args.duration, streams=args.streams)
        after = read_counters()
    finally:
        subject.stop(reg, running)
    result.update({key: after[key] - before[key] for key in after})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--no-tlp", action="store_true", help="also run with TLP off (root)")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args()
    iperf3 = shutil.which("iperf3")
    if iperf3 is None:
        print(f"iperf3 not found; install it: {INSTALL_HINT}")
        return 1
    subjects: list[Proxy] = [
        Direct(),
        HAProxy(1000),
        HAProxy(1000, splice=True),
        loble("recv_into"),
        loble("splice"),
        loble("auto"),
    ]
    subjects = [s for s in subjects if s.unavailable() is None]
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="loble-retrans-") as scratch:
        reg = Registry(Path(scratch))
        try:
            _, backend = start_iperf_server(reg, iperf3)
            for round_ in range(args.rounds):
                order = subjects[round_ % len(subjects) :] + subjects[: round_ % len(subjects)]
                for subject in order:
                    runs.setdefault(subject.name, []).append(
                        measure(reg, subject, iperf3, backend, args)
                    )
                if args.no_tlp:
                    with early_retrans("0"):
                        for subject in subjects:
                            if "splice" in subject.name:
                                runs.setdefault(f"{subject.name} (TLP off)", []).append(
                                    measure(reg, subject, iperf3, backend, args)
                                )
        finally:
            reg.close()
    columns = ("gbit_per_s", "retransmits", "retrans_segs", "loss_probes", "dsack_segs")
    print(f"iperf3 -P {args.streams} -t {args.duration:g}, median of {args.rounds} rounds")
    print(f"{'subject':28} {'Gbit/s':>7} {'iperf3 rtx':>10} {'RetransSegs':>11} "
          f"{'TLPs':>6} {'DSACKed':>7}")  # fmt: skip
    for name, results in runs.items():
        medians = [statistics.median(float(r[c] or 0) for r in results) for c in columns]
        print(f"{name:28} {medians[0]:7.2f} " + " ".join(
            f"{m:{w}.0f}" for m, w in zip(medians[1:], (10, 11, 6, 7), strict=True)
        ))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
