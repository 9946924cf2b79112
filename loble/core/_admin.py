"""The operator's say over a backend: its admin state, beside its health.

Theory of operation
===================

Health (``_health``) is what Loble *observes* of a backend; the admin state
is what an *operator* decided, and the two are orthogonal, as HAProxy keeps
a server's administrative state beside its operational one. A backend takes
new connections only when both agree: health ``HEALTHY`` and admin
``READY``.

* ``READY``: the operator lets health decide.
* ``DRAIN``: no new connections; the ones it has run on until they end.
  Probes and the health machine go on, so the operator sees whether it would
  be healthy, and an ``UNDRAIN`` puts it back at once if it is.
* ``MAINT``: no new connections and no probes (the backend may be down on
  purpose: probing it would only log failures). Connections it still has
  run on, and their verdicts still reach the health machine. Leaving
  ``MAINT`` restarts probing as for any backend the control plane probes:
  an unhealthy one must earn its way back with ``success_threshold`` probe
  successes, as always.

::

    READY --DRAIN--> DRAIN --UNDRAIN--> READY
    any --MAINTENANCE--> MAINT
    any --READY--> READY
    MAINT --DRAIN--> DRAIN   (probing again, still no traffic)

``UNDRAIN`` undoes a ``DRAIN`` only: from ``MAINT`` it is refused (the
operator meant ``READY``, or did not know the backend was in maintenance:
either way, say so rather than guess). ``DRAIN`` from ``MAINT`` is allowed:
it is the natural step back from maintenance, probing first and taking no
traffic until an ``UNDRAIN``. A request that changes nothing (``DRAIN`` when
already draining, ``UNDRAIN`` when ready) is a legal row that changes
nothing, so an operator's script may repeat itself safely.

The machine is :data:`ADMIN_TRANSITIONS`, one dict keyed by
``(state, input)`` whose value is the next state; a pair missing from it is
refused with a :class:`LobleError` naming the backend, the input and the
state. These are an operator's requests, not a driver's reports, so a
refusal is a user error to answer in one line, not a
:class:`StateMachineError`.
"""

from __future__ import annotations

import enum

from ._errors import LobleError

__all__ = ["ADMIN_TRANSITIONS", "AdminInput", "AdminState", "next_admin_state"]


class AdminState(enum.Enum):
    __hash__ = object.__hash__  # identity hashing in C; see _health.HealthState

    READY = "ready"
    DRAIN = "drain"
    MAINT = "maint"


class AdminInput(enum.Enum):
    __hash__ = object.__hash__

    DRAIN = "drain"
    UNDRAIN = "undrain"
    MAINTENANCE = "maintenance"
    READY = "ready"


_R, _D, _M = AdminState.READY, AdminState.DRAIN, AdminState.MAINT
_I = AdminInput

ADMIN_TRANSITIONS: dict[tuple[AdminState, AdminInput], AdminState] = {
    (_R, _I.DRAIN): _D,
    (_D, _I.DRAIN): _D,
    (_M, _I.DRAIN): _D,
    (_R, _I.UNDRAIN): _R,
    (_D, _I.UNDRAIN): _R,
    # (MAINT, UNDRAIN) is missing on purpose: see the module docstring.
    (_R, _I.MAINTENANCE): _M,
    (_D, _I.MAINTENANCE): _M,
    (_M, _I.MAINTENANCE): _M,
    (_R, _I.READY): _R,
    (_D, _I.READY): _R,
    (_M, _I.READY): _R,
}
"""Every legal ``(state, input)`` pair and the state it leads to."""


def next_admin_state(address: str, state: AdminState, admin_input: AdminInput) -> AdminState:
    """The state ``admin_input`` leads to from ``state``; LobleError if illegal."""
    new = ADMIN_TRANSITIONS.get((state, admin_input))
    if new is None:
        raise LobleError(f"backend {address}: can't {admin_input.name} when admin={state.name}")
    return new
