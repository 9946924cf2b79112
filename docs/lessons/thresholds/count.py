"""Read a ``loble sim --json`` report on stdin (one run, or ``--runs K``) and print,
for each run, what the thresholds lesson counts."""

import json
import sys

document = json.load(sys.stdin)
for report in document.get("reports", [document]):  # --runs K: one report per seed
    flapping = next(b for b in report["backends"] if b["address"] == "10.0.8.3:80")
    print(
        f"seed {report['seed']}: {len(report['timeline'])} transitions; "
        f"{flapping['address']} refused {flapping['connect_failures']} connects, "
        f"was in rotation {flapping['seconds_in_state']['healthy']:.1f} s"
    )
