"""Backends and the immutable snapshots of the ones eligible for traffic.

A :class:`Snapshot` is built whole and never changed. The control plane
publishes a new one by rebinding a single attribute, so a reader that takes
``control.snapshot`` once per connection never sees a half-built list: the
Read-Copy-Update pattern of the original Go design, where CPython's atomic
attribute rebinding stands in for ``atomic.Pointer``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Backend", "Snapshot"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Backend:
    """One upstream server: where it is and how much traffic it takes."""

    address: str
    """``host:port`` (``[v6addr]:port`` for IPv6), the key used everywhere."""
    weight: int = 1
    backup: bool = False
    """Taken only while no primary (non-backup) backend is healthy."""

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("a backend needs an address")
        if self.weight < 1:
            raise ValueError(f"backend {self.address}: weight must be >= 1, not {self.weight}")

    @property
    def host(self) -> str:
        host, _, _ = self.address.rpartition(":")
        return host[1:-1] if host.startswith("[") else host

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """The backends eligible for new connections, at one version.

    ``version`` increases by one each time the *membership* changes and at no
    other time: the no-churn guarantee.
    """

    version: int
    backends: tuple[Backend, ...]

    def __len__(self) -> int:
        return len(self.backends)

    def __contains__(self, address: object) -> bool:
        return any(backend.address == address for backend in self.backends)

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(backend.address for backend in self.backends)
