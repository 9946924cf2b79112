"""The lessons in docs/ really run: each Python example followed by its output
is executed and must print exactly that output."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)


def examples(path: Path) -> list[tuple[str, str | None]]:
    """(code, expected output or None) for each self-contained python block."""
    text = path.read_text()
    blocks = [(m.group(1), m.group(2), m.start(), m.end()) for m in BLOCK.finditer(text)]
    found: list[tuple[str, str | None]] = []
    for index, (language, body, _start, end) in enumerate(blocks):
        if language != "python" or "import" not in body:
            continue  # a signature or fragment, not a runnable example
        expected = None
        if index + 1 < len(blocks):
            next_language, next_body, next_start, _ = blocks[index + 1]
            between = text[end:next_start]
            if next_language == "text" and between.strip().startswith("Output"):
                expected = next_body
        found.append((body, expected))
    return found


ARCHITECTURE = examples(DOCS / "architecture.md")


def test_the_architecture_doc_has_examples_with_output() -> None:
    assert sum(expected is not None for _, expected in ARCHITECTURE) >= 2


@pytest.mark.parametrize(("code", "expected"), ARCHITECTURE)
def test_architecture_example_prints_what_the_doc_says(code: str, expected: str | None) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/architecture.md", "exec"), {"__name__": "doc_example"})
    if expected is not None:
        assert out.getvalue() == expected
