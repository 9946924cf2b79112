"""``loble demo``'s defaults, in a module of their own.

The command line (:mod:`.cli`) shows them in its help without importing the
demo itself (which brings the daemon and anyio), and the demo's options
(:class:`._demo.DemoOptions`) default to them: both import from here, so
neither imports the other at load time.
"""

from __future__ import annotations

__all__ = ["BREAK_EVERY", "FIRST_BREAK", "LIVE_RATE", "PLAIN_RATE"]

LIVE_RATE = 10.0
"""``loble demo``'s client requests a second with the live view: enough for its sparklines."""
PLAIN_RATE = 2.0
"""... and with ``--plain``, where each is an access log line."""
BREAK_EVERY = 30.0
"""``loble demo``'s seconds between two rounds of its schedule (``--break-every``)."""
FIRST_BREAK = 5.0
"""... and from the start to the first round (``--first-break``)."""
