"""The admin API over real HTTP: status, operator changes, tokens, reload.

Every change goes through the core's control plane, so each test checks the
effect where a client sees it too: the status document and where new
connections go.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w

from loble.core import LobleError, parse_config
from loble.io import Daemon

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token"


async def admin_daemon(lab: Any, backends: list[str], token: str = TOKEN, **sections: Any) -> Any:
    return await lab.daemon(
        backends, admin={"enabled": True, "address": "127.0.0.1:0", "token": token}, **sections
    )


async def test_status_shows_every_backend_and_the_traffic_it_carried(net: Any) -> None:
    async with net.loopback() as lab:
        a, b = await lab.backend("a"), await lab.backend("b")
        daemon = await admin_daemon(lab, [a.address, b.address])
        for _ in range(4):
            await net.request(daemon.listen_address, b"hello")
        await net.wait_for(lambda: daemon.core.in_flight == 0)
        status, body = await net.admin_call(daemon.admin_address, "GET", "/status")
        assert status == 200
        assert body["process"] == "running" and body["accepting"] is True
        assert body["snapshot_version"] == 1
        assert body["eligible"] == [a.address, b.address]
        for address in (a.address, b.address):
            backend = net.backend_of(body, address)
            assert backend["state"] == "healthy" and backend["admin"] == "ready"
            assert backend["weight"] == 1
            assert backend["connections"] == {"completed": 2}
            assert backend["bytes_to_backend"] == 2 * len(b"hello")
            assert backend["peak_connections"] >= 1
            assert backend["active_connections"] == 0
        page_status, page = await net.admin_call(daemon.admin_address, "GET", "/")
        assert page_status == 200 and "<title>Loble status</title>" in page


async def test_drain_maintenance_ready_and_weight_go_through_the_control_plane(net: Any) -> None:
    async with net.loopback() as lab:
        a, b = await lab.backend("a"), await lab.backend("b")
        daemon = await admin_daemon(lab, [a.address, b.address])
        admin = daemon.admin_address
        status, done = await net.admin_call(
            admin, "POST", f"/backends/{a.address}/drain", token=TOKEN
        )
        assert (status, done["admin"]) == (200, "drain")
        answers = {await net.request(daemon.listen_address) for _ in range(4)}
        assert answers == {b"b:ping"}  # a drained backend gets no new connection
        _, body = await net.admin_call(admin, "GET", "/status")
        assert body["eligible"] == [b.address] and body["snapshot_version"] == 2
        status, done = await net.admin_call(
            admin, "POST", f"/backends/{a.address}/undrain", token=TOKEN
        )
        assert (status, done["admin"]) == (200, "ready")
        status, done = await net.admin_call(
            admin, "POST", f"/backends/{b.address}/maintenance", token=TOKEN
        )
        assert (status, done["admin"]) == (200, "maint")
        # The admin table refuses UNDRAIN in maintenance: a 400 with the core's line.
        status, refused = await net.admin_call(
            admin, "POST", f"/backends/{b.address}/undrain", token=TOKEN
        )
        assert status == 400 and "can't UNDRAIN when admin=MAINT" in refused["error"]
        status, done = await net.admin_call(
            admin, "POST", f"/backends/{b.address}/ready", token=TOKEN
        )
        assert (status, done["admin"]) == (200, "ready")
        status, done = await net.admin_call(
            admin, "POST", f"/backends/{a.address}/weight", token=TOKEN, body={"weight": 3}
        )
        assert (status, done["weight"]) == (200, 3)
        answers_list = [await net.request(daemon.listen_address) for _ in range(8)]
        assert answers_list.count(b"a:ping") == 6  # weights 3:1, smooth round robin
        lines = lab.logs.find("backend admin state changed", backend=a.address, new="drain")
        assert lines
        assert lab.logs.find("backend weight changed", backend=a.address, old=1, new=3)


async def test_changes_need_the_token_and_refusals_are_logged(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await admin_daemon(lab, [a.address])
        admin = daemon.admin_address
        for token in (None, "wrong", TOKEN + "x"):
            status, body = await net.admin_call(
                admin, "POST", f"/backends/{a.address}/drain", token=token
            )
            assert status == 401 and body["error"] == "missing or wrong bearer token"
        status, _ = await net.admin_call(admin, "POST", "/reload", token="wrong")
        assert status == 401
        refusals = lab.logs.find("admin request refused")
        assert len(refusals) == 4 and all(
            line["client"].startswith("127.0.0.1:") for line in refusals
        )
        _, body = await net.admin_call(admin, "GET", "/status")
        assert net.backend_of(body, a.address)["admin"] == "ready"  # nothing changed
        status, _ = await net.admin_call(admin, "POST", f"/backends/{a.address}/ready", token=TOKEN)
        assert status == 200
        # Neither the token nor a wrong guess at it is ever written to the log.
        written = repr(lab.logs.lines)
        assert TOKEN not in written and "wrong" not in written.replace("missing or wrong", "")


async def test_with_no_token_configured_every_change_is_refused(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await admin_daemon(lab, [a.address], token="")
        status, body = await net.admin_call(
            daemon.admin_address, "POST", f"/backends/{a.address}/drain", token=""
        )
        assert status == 403 and "no [admin] token is configured" in body["error"]
        status, _ = await net.admin_call(daemon.admin_address, "GET", "/status")
        assert status == 200  # reading is allowed


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/backends/10.9.9.9:80/drain", None, 404, "no backend '10.9.9.9:80'"),
        ("/backends/{a}/explode", None, 404, "no action 'explode'"),
        ("/backends/{a}/weight", {"weight": "heavy"}, 400, "weight: 'heavy' is not a whole number"),
        ("/backends/{a}/weight", {"weight": 0}, 400, "weight 0 must be >= 1"),
        ("/backends/{a}/weight", {"weight": True}, 400, "is not a whole number"),
    ],
)
async def test_bad_requests_get_one_line_errors(
    net: Any, path: str, body: object, status: int, error: str
) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await admin_daemon(lab, [a.address])
        got, answer = await net.admin_call(
            daemon.admin_address, "POST", path.format(a=a.address), token=TOKEN, body=body
        )
        assert got == status
        assert error in answer["error"] and "\n" not in answer["error"]


async def test_reload_through_the_api(net: Any, tmp_path: Path) -> None:
    async with net.loopback() as lab:
        a, b = await lab.backend("a"), await lab.backend("b")
        path = tmp_path / "loble.toml"
        daemon = await admin_daemon(lab, [a.address], config_path=path)
        written = {
            "listener": {"address": f"127.0.0.1:{daemon.listen_address[1]}"},
            "admin": {"enabled": True, "address": "127.0.0.1:0", "token": TOKEN},
            "backends": [{"address": a.address}, {"address": b.address}],
        }
        path.write_text(tomli_w.dumps(written), encoding="utf-8")
        status, done = await net.admin_call(daemon.admin_address, "POST", "/reload", token=TOKEN)
        assert status == 200 and done["added"] == [b.address]
        _, body = await net.admin_call(daemon.admin_address, "GET", "/status")
        assert [x["address"] for x in body["backends"]] == [a.address, b.address]
        # States an operator set survive a reload.
        status, _ = await net.admin_call(
            daemon.admin_address, "POST", f"/backends/{a.address}/drain", token=TOKEN
        )
        assert status == 200
        status, done = await net.admin_call(daemon.admin_address, "POST", "/reload", token=TOKEN)
        assert status == 200 and done["added"] == []
        _, body = await net.admin_call(daemon.admin_address, "GET", "/status")
        assert net.backend_of(body, a.address)["admin"] == "drain"
        assert body["eligible"] == [b.address]
        path.write_text("[[backends]]\naddress = 'nope'\n", encoding="utf-8")
        status, refused = await net.admin_call(daemon.admin_address, "POST", "/reload", token=TOKEN)
        assert status == 400 and refused["errors"] == ["backends[0].address: 'nope' has no port"]
        assert lab.logs.find("reload rejected: the running configuration stays")


async def test_a_taken_admin_address_is_a_one_line_error_at_start(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        first = await admin_daemon(lab, [a.address])
        taken = f"{first.admin_address[0]}:{first.admin_address[1]}"
        document = {
            "listener": {"address": "127.0.0.1:0"},
            "admin": {"enabled": True, "address": taken},
            "backends": [{"address": a.address}],
        }
        second = Daemon(parse_config(document))
        with pytest.raises(LobleError) as error:
            await second.bind()
        assert (
            str(error.value) == f"admin.address: cannot listen on {taken}: Address already in use"
        )
