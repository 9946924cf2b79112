"""The admin API examples of docs/operations.md run as written and print what it shows.

Every ``$ curl ...`` line under "The admin API" runs, in order, against a
daemon with ``config.toml``'s backends and admin section (on ports the OS
picks, mapped back to the documented ones in what is compared), and must
print the output below it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from loble.config import read_toml

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"
CONSOLE = re.compile(r"```console\n(.*?)```", re.DOTALL)


def examples() -> list[tuple[str, str]]:
    """(command, expected output) for each ``$`` line of the admin API section, in order."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## The admin API") : text.index("### The status page")]
    found = []
    for block in CONSOLE.findall(section):
        command, output = None, []
        for line in block.splitlines():
            if line.startswith("$ "):
                if command is not None:
                    found.append((command, "\n".join(output)))
                command, output = line[2:], []
            else:
                output.append(line)
        if command is not None:
            found.append((command, "\n".join(output)))
    return found


def test_the_doc_has_an_example_of_every_endpoint() -> None:
    commands = " ".join(command for command, _ in examples())
    for endpoint in (
        "/status",
        "/drain",
        "/undrain",
        "/maintenance",
        "/ready",
        "/weight",
        "/reload",
    ):
        assert endpoint in commands, endpoint


@pytest.mark.skipif(shutil.which("curl") is None, reason="the examples use curl")
async def test_every_admin_api_example_prints_what_the_doc_says(net: Any, tmp_path: Path) -> None:
    shipped = read_toml(ROOT / "config.toml")
    async with net.loopback() as lab:
        backends = [await lab.backend(f"backend-{n}") for n in (1, 2, 3)]
        documented = [entry["address"] for entry in shipped["backends"]]
        weights = {entry["address"]: entry["weight"] for entry in shipped["backends"]}
        daemon = await lab.daemon(
            [b.address for b in backends],
            config_path=tmp_path / "loble.toml",
            listen=f"127.0.0.1:{net.free_port()}",  # as written in the file the reload reads
            admin={**shipped["admin"], "address": "127.0.0.1:0"},
            weights={b.address: weights[d] for b, d in zip(backends, documented, strict=True)},
        )
        real = {
            shipped["admin"]["address"]: "{}:{}".format(*daemon.admin_address),
            shipped["listener"]["address"]: "{}:{}".format(*daemon.listen_address),
            **{d: b.address for d, b in zip(documented, backends, strict=True)},
        }
        for command, expected in examples():
            for doc, actual in real.items():
                command = command.replace(doc, actual)
            done = await anyio.to_thread.run_sync(
                lambda c=command: subprocess.run(
                    ["bash", "-c", c], capture_output=True, text=True, timeout=20, check=False
                )
            )
            printed = done.stdout.strip()
            for doc, actual in real.items():
                printed = printed.replace(actual, doc)
            assert printed == expected.strip(), command
