"""The status page in a real headless browser: what it shows is what ``GET /status`` says.

Debian's chromium, driven by selenium through its chromedriver, loads the page
from a real daemon with three backends; the test reads the table back and
compares it with ``/status``, then drains a backend with a click. Selenium
blocks, so every browser call runs in a worker thread and the daemon, on the
test's loop, keeps serving the page meanwhile.

Without chromium, chromedriver or selenium the tests skip and say why; CI
installs them (``.ci/run``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from loble.io._loop import new_event_loop

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "secret"
WAIT_BOUND = 10.0
"""Seconds the page may take to show something (it refreshes itself each second)."""

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # as root in CI's container
    "--disable-gpu",
    "--disable-dev-shm-usage",
    # This machine's network is closed: without these Chromium keeps dialling Google.
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,600",
]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no {CHROMIUM} (Debian package chromium)"),
    pytest.mark.skipif(
        not CHROMEDRIVER.exists(), reason=f"no {CHROMEDRIVER} (Debian package chromium-driver)"
    ),
]

ROWS = """
return [...document.querySelectorAll("#backends tr")].map((row) => Object.fromEntries(
  [...row.cells].map((cell) => [cell.dataset.field, cell.textContent])));
"""
"""The table as the page shows it, one dict per row keyed by each cell's field,
read in one call so that a refresh cannot land between two cells."""


@pytest.fixture
def anyio_backend() -> Any:
    # The page is the same whatever loop serves /status: one browser run, on the
    # loop `loble run` makes.
    return ("asyncio", {"loop_factory": new_event_loop})


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module, with its own empty profile."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


async def in_browser(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking selenium call in a worker thread: the daemon goes on serving."""
    return await anyio.to_thread.run_sync(partial(fn, *args))


def wait_until(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    """Poll ``condition(driver)`` until it is truthy; fail after :data:`WAIT_BOUND`."""
    return WebDriverWait(driver, WAIT_BOUND, poll_frequency=0.02).until(
        condition, f"the page did not show {what} within {WAIT_BOUND}s"
    )


def rows(driver: Any) -> dict[str, dict[str, str]]:
    return {row["backend"]: row for row in driver.execute_script(ROWS)}


def row_shows(address: str, field: str, text: str) -> Callable[[Any], bool]:
    return lambda driver: rows(driver).get(address, {}).get(field) == text


def click(driver: Any, address: str, action: str) -> None:
    driver.find_element(
        By.CSS_SELECTOR, f'tr[data-backend="{address}"] button[data-action="{action}"]'
    ).click()


async def status(net: Any, daemon: Any) -> dict[str, Any]:
    code, body = await net.scrape(daemon.admin_address, "/status")
    assert code == 200
    document: dict[str, Any] = json.loads(body)
    return document


@asynccontextmanager
async def page_daemon(net: Any) -> AsyncIterator[tuple[Any, Any]]:
    """A daemon with three backends of weights 3, 2, 1, after six completed connections.

    On the way out it is shut down and waited for, HTTP endpoints included:
    the rig's own teardown cancels a daemon as soon as its connections are
    done, which can land while hypercorn still waits out the browser's idle
    keep-alive connections, and hypercorn's asyncio server fails if cancelled
    then."""
    async with net.loopback() as lab:
        backends = [await lab.backend(name) for name in ("a", "b", "c")]
        daemon = await lab.daemon(
            [backend.address for backend in backends],
            weights={"a": 3, "b": 2, "c": 1},
            admin={"enabled": True, "address": "127.0.0.1:0", "token": TOKEN},
            health={"active": True, "probe_interval": 0.2, "probe_timeout": 0.2},
        )
        try:
            for _ in range(6):
                assert (await net.request(daemon.listen_address)).endswith(b":ping")

            async def counted() -> bool:
                backends = (await status(net, daemon))["backends"]
                probed = all(b["last_probe_ok"] for b in backends)
                return probed and sum(b["connections"].get("completed", 0) for b in backends) == 6

            await net.wait_for(counted, what="six completed connections and a probe of each")
            yield lab, daemon
        finally:
            with anyio.CancelScope(shield=True):
                daemon.shutdown()
                await net.wait_for(lambda: lab.logs.find("stopped"), what="the daemon stopped")


def url(daemon: Any) -> str:
    host, port = daemon.admin_address
    return f"http://{host}:{port}/"


async def test_the_page_shows_what_status_says(net: Any, browser: Any) -> None:
    async with page_daemon(net) as (_, daemon):
        await in_browser(browser.get, url(daemon))
        expected = (await status(net, daemon))["backends"]
        addresses = [backend["address"] for backend in expected]

        shown = await in_browser(
            wait_until,
            browser,
            lambda driver: list(rows(driver)) == addresses and rows(driver),
            "a row for every backend",
        )
        for backend in expected:
            row = shown[backend["address"]]
            assert row["state"] == backend["state"] == "healthy"
            assert row["admin"] == backend["admin"] == "ready"
            assert row["weight"] == str(backend["weight"])
            assert row["completed"] == str(backend["connections"]["completed"])
            assert row["failed"] == "0"
            assert row["active"] == "0"
            assert row["peak"] == str(backend["peak_connections"]) == "1"
            assert row["last_check"].startswith("ok, ")
        # weights 3, 2, 1 over six connections: smooth round robin gives 3, 2, 1
        assert [shown[address]["weight"] for address in addresses] == ["3", "2", "1"]
        assert [shown[address]["completed"] for address in addresses] == ["3", "2", "1"]
        summary = await in_browser(lambda: browser.find_element(By.ID, "summary").text)
        assert "3 of 3 backends eligible" in summary


async def test_drain_with_a_click_needs_the_token(net: Any, browser: Any, tmp_path: Path) -> None:
    async with page_daemon(net) as (lab, daemon):
        first, second, _ = [b["address"] for b in (await status(net, daemon))["backends"]]
        await in_browser(browser.get, url(daemon))
        await in_browser(
            wait_until, browser, lambda driver: len(rows(driver)) == 3, "every backend"
        )

        # No token typed: the daemon refuses, the page says so, nothing changes.
        await in_browser(click, browser, first, "drain")
        message = await in_browser(
            wait_until,
            browser,
            lambda driver: driver.find_element(By.ID, "message").text,
            "the refusal",
        )
        assert message == f"drain {first} refused (401): missing or wrong bearer token"
        backends = (await status(net, daemon))["backends"]
        assert [b["admin"] for b in backends] == ["ready", "ready", "ready"]
        assert lab.logs.find("admin request refused", reason="missing or wrong bearer token")
        assert (await in_browser(rows, browser))[first]["admin"] == "ready"

        # With the token, the click drains that backend and the row says so.
        token = await in_browser(browser.find_element, By.ID, "token")
        await in_browser(token.send_keys, TOKEN)
        await in_browser(click, browser, second, "drain")
        await in_browser(
            wait_until, browser, row_shows(second, "admin", "drain"), f"{second} drained"
        )
        backends = {b["address"]: b for b in (await status(net, daemon))["backends"]}
        assert backends[second]["admin"] == "drain"
        assert [b["admin"] for a, b in backends.items() if a != second] == ["ready", "ready"]
        shown = await in_browser(rows, browser)
        assert shown[second]["action"] == "ready"  # the way back is one click away
        assert shown[first]["action"] == "drain"
        message = await in_browser(lambda: browser.find_element(By.ID, "message").text)
        assert message == f"drain {second}: done, admin state now drain"
        # a drained backend gets no new connections
        for _ in range(3):
            assert not (await net.request(daemon.listen_address)).startswith(b"b:")

        screenshot = tmp_path / "status-page.png"
        assert await in_browser(browser.save_screenshot, str(screenshot))
        assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
