"""Shared test settings: hypothesis profiles.

* ``default``: the everyday run, sized so the whole suite stays within a few
  minutes on 2 cores.
* ``thorough``: ``LOBLE_THOROUGH=1`` runs far more examples, for a soak.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=2_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("thorough" if os.environ.get("LOBLE_THOROUGH") else "default")
