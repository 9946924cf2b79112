"""With ``[outlier]`` left out, the core does exactly what it did before it existed.

A scripted run (a seeded driver making every kind of report: connects that
succeed, fail and time out, streams that complete, half-close and reset,
probes, an operator's drain, a reload that removes and adds backends, a
shutdown) is fed to a core with the default configuration, and the digest
of every output it returned, in order, is compared with the digest the same
run gave on the commit before outlier ejection (51bfce4). This file uses
nothing that commit lacked, so the figure can be made again there:
``PYTHONPATH=<that tree> python tests/core/test_outlier_off.py``.

One deliberate change since: a probe is filed an interval after it was
*due*, not after the late timer call that issued it (the daemon's probes
drifted by the event loop's lateness). The script's timer calls come late,
so its digest changed with that commit; it is checked on 51bfce4 with that
one change applied (``ControlPlane.handle_timer``), and is ``BEFORE`` here.

``ProbeBackend`` has carried a ``check`` since payload probes: the digest
reads a probe that only connects (``CONNECT_ONLY``, the default) as the
action read before it had one, and any other check changes the digest.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from loble.core import (
    AdminInput,
    CloseConnection,
    ConnectBackend,
    Output,
    ProbeBackend,
    ProxyCore,
    parse_config,
)

CONNECT_ONLY_REPR = ", check=ProbeCheck()"
BEFORE = "028ece9365570e7cd3f2c72c1031bc2a413410419b528079ca6f62ac53888e32"
BACKENDS = [f"10.9.0.{i}:80" for i in range(1, 6)]


def document(backends: list[str], **sections: Any) -> dict[str, Any]:
    return {"backends": [{"address": a} for a in backends], **sections}


def scripted_run(**sections: Any) -> str:
    """The sha256 of the repr of every output of the scripted run, in order."""
    digest = hashlib.sha256()
    driver = random.Random(7)
    proxy = ProxyCore(parse_config(document(BACKENDS, **sections)), random.Random(3))
    pending: dict[int, int] = {}
    established: set[int] = set()
    probes: list[str] = []
    bad = {BACKENDS[0]: 0.6, BACKENDS[1]: 0.05}  # share of its connects that fail
    now = 0.0

    def take(outputs: list[Output] | None) -> None:
        digest.update(repr(outputs).replace(CONNECT_ONLY_REPR, "").encode())
        for output in outputs or ():
            if isinstance(output, ConnectBackend):
                pending[output.connection_id] = output.attempt
                established.discard(output.connection_id)
            elif isinstance(output, CloseConnection):
                pending.pop(output.connection_id, None)
                established.discard(output.connection_id)
            elif isinstance(output, ProbeBackend):
                probes.append(output.backend.address)

    take(proxy.start(now))
    for step in range(4_000):
        now += driver.expovariate(40.0)
        due = proxy.next_deadline()
        if due is not None and due <= now:
            take(proxy.handle_timer(now))
        roll = driver.random()
        if step == 2_000:
            reloaded = document([*BACKENDS[1:], "10.9.0.9:80"], **sections)
            take(proxy.reconfigure(parse_config(reloaded), now))
        elif step in (700, 2_600):
            take(proxy.admin(BACKENDS[2], AdminInput.DRAIN, now))
        elif step in (900, 2_800):
            take(proxy.admin(BACKENDS[2], AdminInput.UNDRAIN, now))
        elif roll < 0.35:
            connection_id, outputs = proxy.accept(now, ("192.0.2.1", step))
            take(outputs)
        elif roll < 0.6 and pending:
            connection_id = driver.choice(sorted(pending))
            attempt = pending[connection_id]
            backend = proxy.connections[connection_id].backend
            assert backend is not None
            address = backend.address
            if driver.random() < bad.get(address, 0.0):
                take(proxy.connect_failed(connection_id, attempt, now))
            elif driver.random() < 0.97:
                outputs = proxy.connected(connection_id, attempt, now)
                take(outputs)
                if outputs is not None:
                    pending.pop(connection_id, None)
                    established.add(connection_id)
        elif roll < 0.9 and established:
            connection_id = driver.choice(sorted(established))
            state = proxy.connections[connection_id].state.name
            kind = driver.random()
            if kind < 0.4 and state != "BACKEND_DONE":
                take(proxy.backend_eof(connection_id, now))
            elif kind < 0.55 and state != "CLIENT_DONE":
                take(proxy.client_eof(connection_id, now))
            elif kind < 0.7:
                take(proxy.backend_error(connection_id, now))
            elif kind < 0.8:
                take(proxy.client_error(connection_id, now))
            else:
                proxy.touch(connection_id, now)
        elif probes:
            address = probes.pop(0)
            take(proxy.probe_result(address, driver.random() < 0.7, now))
    take(proxy.shutdown(now))
    while not proxy.stopped:
        due = proxy.next_deadline()
        assert due is not None
        now = max(now, due)
        take(proxy.handle_timer(now))
    return digest.hexdigest()


def test_the_default_configuration_makes_the_same_outputs_as_before() -> None:
    assert scripted_run() == BEFORE


def test_outlier_keys_that_judge_nothing_change_nothing() -> None:
    """Timings without a rule that judges are still off: the very same outputs."""
    quiet = {"interval": 1.0, "base_ejection_time": 2.0, "max_ejection_percent": 100}
    assert scripted_run(outlier=quiet) == BEFORE


if __name__ == "__main__":
    print(scripted_run())
