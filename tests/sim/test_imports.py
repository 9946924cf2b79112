"""The simulator drives the core through its public face only, as any driver would."""

from __future__ import annotations

import ast
from pathlib import Path

import loble.sim

SIM = Path(loble.sim.__file__).parent


def test_the_simulator_imports_no_core_private() -> None:
    for path in sorted(SIM.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                assert not node.module.startswith("loble.core._"), (path.name, node.module)
                if node.module == "loble.core":
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert private == [], (path.name, private)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("loble.core._"), (path.name, alias.name)
