"""The operator's admin machine: every (state, input) pair, then through ProxyCore."""

from __future__ import annotations

import itertools
import random

import pytest

from loble.core import (
    AdminInput,
    AdminState,
    AdminStateChanged,
    LobleError,
    ProbeBackend,
    ProxyCore,
    SnapshotPublished,
    WeightChanged,
    parse_config,
)
from loble.core._admin import ADMIN_TRANSITIONS, next_admin_state

R, D, M = AdminState.READY, AdminState.DRAIN, AdminState.MAINT
In = AdminInput
A, B = "10.0.0.1:80", "10.0.0.2:80"

# Every pair and where it leads; None: refused.
EXPECTED: dict[tuple[AdminState, AdminInput], AdminState | None] = {
    (R, In.DRAIN): D,
    (D, In.DRAIN): D,
    (M, In.DRAIN): D,
    (R, In.UNDRAIN): R,
    (D, In.UNDRAIN): R,
    (M, In.UNDRAIN): None,
    (R, In.MAINTENANCE): M,
    (D, In.MAINTENANCE): M,
    (M, In.MAINTENANCE): M,
    (R, In.READY): R,
    (D, In.READY): R,
    (M, In.READY): R,
}


def test_the_sweep_covers_every_pair() -> None:
    assert set(EXPECTED) == set(itertools.product(AdminState, AdminInput))
    assert {pair for pair, new in EXPECTED.items() if new is not None} == set(ADMIN_TRANSITIONS)


@pytest.mark.parametrize(("pair", "expected"), list(EXPECTED.items()))
def test_every_pair(pair: tuple[AdminState, AdminInput], expected: AdminState | None) -> None:
    state, admin_input = pair
    if expected is None:
        with pytest.raises(LobleError) as error:
            next_admin_state(A, state, admin_input)
        assert str(error.value) == f"backend {A}: can't {admin_input.name} when admin={state.name}"
    else:
        assert next_admin_state(A, state, admin_input) is expected


def core(**sections: object) -> ProxyCore:
    data: dict[str, object] = {"backends": [{"address": A}, {"address": B}]}
    data.update(sections)
    proxy = ProxyCore(parse_config(data), random.Random(1))
    proxy.start(0.0)
    return proxy


def test_drain_takes_a_backend_out_and_undrain_puts_it_back() -> None:
    proxy = core()
    assert proxy.admin(A, In.DRAIN, 1.0) == [
        AdminStateChanged(at=1.0, address=A, old=R, new=D),
        SnapshotPublished(at=1.0, version=2, addresses=(B,)),
    ]
    assert proxy.admin(A, In.DRAIN, 2.0) == []  # nothing changed: no churn
    assert proxy.admin(A, In.UNDRAIN, 3.0) == [
        AdminStateChanged(at=3.0, address=A, old=D, new=R),
        SnapshotPublished(at=3.0, version=3, addresses=(A, B)),
    ]


def test_a_drained_backends_connections_run_on() -> None:
    proxy = core()
    cid, outputs = proxy.accept(0.0)
    proxy.connected(cid, 1, 0.1)
    proxy.admin(A, In.DRAIN, 1.0)
    assert proxy.statistics().backends[0].active_connections == 1
    for _ in range(3):  # every new connection goes to B
        _, outputs = proxy.accept(1.5)
        assert [o.backend.address for o in outputs if hasattr(o, "backend")] == [B]
    proxy.client_eof(cid, 2.0)
    proxy.backend_eof(cid, 2.1)
    assert proxy.statistics().backends[0].active_connections == 0


def test_an_admin_change_on_an_unhealthy_backend_publishes_nothing() -> None:
    proxy = core(health={"failure_threshold": 1})
    cid, _ = proxy.accept(0.0)
    proxy.connect_failed(cid, 1, 0.1)  # A out; the retry went to B
    assert proxy.snapshot.addresses == (B,)
    assert proxy.admin(A, In.MAINTENANCE, 1.0) == [
        AdminStateChanged(at=1.0, address=A, old=R, new=M)
    ]


def test_maintenance_stops_probes_and_ready_restarts_them() -> None:
    proxy = core(health={"active": True, "probe_interval": 1.0, "probe_timeout": 0.5})
    proxy.admin(A, In.MAINTENANCE, 0.5)
    probes = [o for o in proxy.handle_timer(1.0) if isinstance(o, ProbeBackend)]
    assert [p.backend.address for p in probes] == [B]
    assert proxy.next_deadline() == 2.0  # B's next; none for A
    proxy.probe_result(B, True, 1.1)
    (probe,) = [o for o in proxy.handle_timer(2.0) if isinstance(o, ProbeBackend)]
    assert probe.backend.address == B
    proxy.admin(A, In.READY, 2.5)  # probed again from an interval on
    probes = [o for o in proxy.handle_timer(3.5) if isinstance(o, ProbeBackend)]
    assert [p.backend.address for p in probes] == [A]


def test_leaving_maintenance_unhealthy_needs_probes_to_come_back() -> None:
    proxy = core(health={"failure_threshold": 1, "success_threshold": 2, "probe_interval": 1.0})
    cid, _ = proxy.accept(0.0)
    proxy.connect_failed(cid, 1, 0.0)  # A unhealthy, probed from t=1
    proxy.admin(A, In.MAINTENANCE, 0.5)
    assert proxy.handle_timer(1.0) == []  # its probe is dropped in maintenance
    assert proxy.admin(A, In.DRAIN, 2.0) == [AdminStateChanged(at=2.0, address=A, old=M, new=D)]
    (probe,) = proxy.handle_timer(3.0)
    assert isinstance(probe, ProbeBackend)
    proxy.probe_result(A, True, 3.1)
    proxy.handle_timer(4.0)
    outputs = proxy.probe_result(A, True, 4.1)  # healthy, but drained: still out
    assert [type(o).__name__ for o in outputs] == ["BackendStateChanged"]
    assert proxy.snapshot.addresses == (B,)
    assert proxy.admin(A, In.UNDRAIN, 5.0)[-1] == SnapshotPublished(
        at=5.0, version=3, addresses=(A, B)
    )


def test_admin_errors_are_one_line() -> None:
    proxy = core()
    with pytest.raises(LobleError, match=r"^backends: no backend '10.9.9.9:80'$"):
        proxy.admin("10.9.9.9:80", In.DRAIN, 1.0)
    proxy.admin(A, In.MAINTENANCE, 1.0)
    with pytest.raises(LobleError, match=rf"^backend {A}: can't UNDRAIN when admin=MAINT$"):
        proxy.admin(A, In.UNDRAIN, 1.0)


def test_set_weight_republishes_only_an_eligible_backend() -> None:
    proxy = core()
    assert proxy.set_weight(B, 5, 1.0) == [
        WeightChanged(at=1.0, address=B, old=1, new=5),
        SnapshotPublished(at=1.0, version=2, addresses=(A, B)),
    ]
    assert proxy.snapshot.backends[1].weight == 5
    assert proxy.set_weight(B, 5, 2.0) == []
    proxy.admin(A, In.DRAIN, 3.0)
    assert proxy.set_weight(A, 7, 4.0) == [WeightChanged(at=4.0, address=A, old=1, new=7)]
    published = proxy.admin(A, In.READY, 5.0)[-1]
    assert isinstance(published, SnapshotPublished)
    assert proxy.snapshot.backends[0].weight == 7
    assert proxy.statistics().backends[0].weight == 7


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (0, f"backend {B}: weight 0 must be >= 1"),
        (10**7, f"backend {B}: weight 10000000 must be <= 1000000"),
        (1.5, f"backend {B}: weight 1.5 is not an integer"),
        (True, f"backend {B}: weight True is not an integer"),
    ],
)
def test_set_weight_has_the_configs_bounds(weight: object, message: str) -> None:
    with pytest.raises(LobleError) as error:
        core().set_weight(B, weight, 1.0)  # type: ignore[arg-type]
    assert str(error.value) == message


def test_set_weight_on_an_unknown_backend() -> None:
    with pytest.raises(LobleError, match=r"^backends: no backend '10.9.9.9:80'$"):
        core().set_weight("10.9.9.9:80", 3, 1.0)
