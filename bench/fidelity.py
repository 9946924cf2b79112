"""The simulator against the daemon, on the shipped scenarios in full.

Not a test: run it by hand, ``python bench/fidelity.py`` (about 11 minutes;
``--only backend-crash,slow-drain`` for some, ``--seed N``). For each
scenario it runs the simulation with a trace, replays the run's arrivals,
durations and fault schedule on 127.0.0.1 against ``loble run`` (the harness
is ``tests/io/fidelity.py``, the short form of which runs in the test suite),
prints per scenario the connections, the per-connection match, the outcome
counts of both runs and each state change's time in both, and writes every
figure as JSON to ``bench/results/fidelity-<commit>.json`` (``--out``).

Run it with nothing else loading the machine, as the other benches:
``flock -x /tmp/loble-bench.lock python bench/fidelity.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "io" / "fidelity.py"
SCENARIOS = ROOT / "scenarios"

REPLAYABLE = (
    "backend-crash",
    "backend-kill",
    "slow-drain",
    "graceful-shutdown",
    "all-down-recover",
    "host-down",
    "accept-hang",
    "flapping-backend",
    "weighted-fleet",
)
"""The shipped scenarios the harness plays: not yet an operator's actions
(rolling-maintenance), requests and service times (keepalive-requests),
client timeouts and retries (client-retries), drawn faults and timer jitter
(random-failures); ``fidelity.simulate`` refuses those with a reason."""


def harness() -> Any:
    spec = importlib.util.spec_from_file_location("loble_fidelity", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def commit() -> tuple[str, bool]:
    """The commit the run starts from, and whether the tree differs from it (a
    dirty tree is named so: ``loble run`` is started from the tree as it is)."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return head.stdout.strip() or "unknown", bool(status.stdout.strip())


def show(figures: dict[str, Any], problems: list[str]) -> None:
    per = figures["per_connection"]

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.2%}"

    print(
        f"\n== {figures['scenario']} seed {figures['seed']} ({figures['algorithm']}): "
        f"{figures['arrivals']} connections, {figures['wall_seconds']:.1f} s"
    )
    print(
        f"  per connection: outcome {share(per['outcome_match'])}, "
        f"backend {share(per['backend_match'])} of {per['served_in_sim']} served, "
        f"spaced {share(per['spaced_backend_match'])} of {per['spaced']}"
    )
    print("  client saw        sim   real")
    for saw, pair in figures["counts"].items():
        print(f"  {saw:<17}{pair['sim']:>5}  {pair['real']:>5}")
    print("  Loble's outcome   sim   real")
    for outcome, pair in figures["loble_outcomes"].items():
        print(f"  {outcome:<17}{pair['sim']:>5}  {pair['real']:>5}")
    for row in figures["transitions"]:
        sim = "-" if row["sim"] is None else f"{row['sim'][0]:8.3f} {row['sim'][1]}"
        real = "-" if row["real"] is None else f"{row['real'][0]:8.3f} {row['real'][1]}"
        diff = "" if row["diff_ms"] is None else f"{row['diff_ms']:+.1f} ms"
        print(f"  {row['address']}: sim {sim} | real {real} | {diff}")
    shutdown = figures["shutdown"]
    if shutdown["sim"] is not None:
        print(f"  shutdown: sim {shutdown['sim']} | real {shutdown['real']}")
    late = figures["late_start_ms"]
    print(f"  clients late to connect (ms): p50 {late['p50']} p99 {late['p99']} max {late['max']}")
    for line in problems:
        print(f"  OUT OF TOLERANCE: {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(REPLAYABLE)
    fidelity = harness()
    results = []
    head, dirty = commit()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            document = fidelity.load_document(SCENARIOS / f"{name}.toml")
            figures = fidelity.fidelity(
                document, name, args.seed, Path(workdir), base_dir=SCENARIOS
            )
            problems = fidelity.problems(figures)
            show(figures, problems)
            results.append({**figures, "problems": problems})
    took = time.monotonic() - started
    out = args.out or ROOT / "bench" / "results" / f"fidelity-{head}.json"
    summary = {"commit": head, "dirty": dirty, "seconds": round(took, 1), "runs": results}
    out.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"\n{len(results)} scenarios in {took:.0f} s; figures in {out}")
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
