"""mkdocs hooks (named in mkdocs.yml): the docs site's small fix-ups.

The docstrings of ``loble.core`` name other objects with Sphinx roles
(``:class:`ProxyCore```, ``:meth:`touch```), which Markdown leaves as a
literal ``:class:`` before the code span. On the Library API page the role
is dropped and the name stays a code span.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc|obj):(?=<code>)")


def on_page_content(html: str, page: Any, **_: Any) -> str:
    return _ROLE.sub("", html)
