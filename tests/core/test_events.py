"""The positional makers build the very objects the dataclass constructors do."""

from __future__ import annotations

import dataclasses

import pytest

from loble.core import (
    Backend,
    CloseConnection,
    ConnectBackend,
    ConnectionClosed,
    Outcome,
    ShutdownWrite,
    Side,
)
from loble.core._connection import close_connection
from loble.core._events import connect_backend, connection_closed, shutdown_write

BACKEND = Backend(address="10.0.0.1:80", weight=2)


@pytest.mark.parametrize(
    ("made", "constructed"),
    [
        (
            connect_backend(3, 2, BACKEND),
            ConnectBackend(connection_id=3, attempt=2, backend=BACKEND),
        ),
        (shutdown_write(4, Side.CLIENT), ShutdownWrite(connection_id=4, side=Side.CLIENT)),
        (
            close_connection(5, Outcome.COMPLETED),
            CloseConnection(connection_id=5, outcome=Outcome.COMPLETED, reset=False),
        ),
        (
            close_connection(5, Outcome.BACKEND_RESET),
            CloseConnection(connection_id=5, outcome=Outcome.BACKEND_RESET, reset=True),
        ),
        (
            connection_closed(
                9.5, 6, "10.0.0.1:80", Outcome.COMPLETED, 2, 1.0, 1.25, ("10.0.0.2:80",)
            ),
            ConnectionClosed(
                at=9.5,
                connection_id=6,
                backend="10.0.0.1:80",
                outcome=Outcome.COMPLETED,
                attempts=2,
                opened_at=1.0,
                connected_at=1.25,
                tried=("10.0.0.2:80",),
            ),
        ),
    ],
    ids=[
        "ConnectBackend",
        "ShutdownWrite",
        "CloseConnection",
        "CloseConnection-reset",
        "ConnectionClosed",
    ],
)
def test_makers_match_the_constructors_and_stay_frozen(made: object, constructed: object) -> None:
    assert type(made) is type(constructed)
    assert made == constructed
    assert hash(made) == hash(constructed)
    assert repr(made) == repr(constructed)
    # Every field set, in declaration order: a field added to the class and
    # not to its maker would be missing here.
    fields = dataclasses.fields(constructed)  # type: ignore[arg-type]
    assert [getattr(made, f.name) for f in fields] == [getattr(constructed, f.name) for f in fields]
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.connection_id = 0  # type: ignore[attr-defined]
    # The makers skip __init__: validation added to the class would be skipped too.
    assert not hasattr(type(made), "__post_init__")
