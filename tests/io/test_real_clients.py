"""Real protocols through Loble: TLS passed through untouched, end to end.

Loble is an L4 proxy: a TLS session between a client and a backend must
pass through it byte for byte, handshake included, so the client verifies
the backend's own certificate and both sides see every record. The backend
here is Python's ``ssl`` server with a certificate made for the test by
``openssl``; the client checks the certificate it got is exactly that one,
sends a known pattern of 2 MiB, and checks its echo.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        shutil.which("openssl") is None, reason="needs openssl to make a certificate"
    ),
]

PATTERN = bytes(range(256)) * 8192  # 2 MiB, every byte value, position-dependent


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


class TlsEcho:
    """A TLS server in a thread: echoes everything it reads until the client's EOF."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.errors: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(raw,), daemon=True).start()

    def _echo(self, raw: socket.socket) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                while chunk := tls.recv(65536):
                    tls.sendall(chunk)
        except (OSError, ssl.SSLError) as error:
            self.errors.append(repr(error))

    def close(self) -> None:
        self.listener.close()


def tls_round_trip(address: tuple[str, int], cert: Path) -> tuple[bytes, bytes]:
    """A verifying TLS client: (the certificate it was shown, DER; the echo of PATTERN).

    It sends 64 KiB at a time and reads each echo back before the next (one
    TLS connection is not to be read and written from two threads at once).
    """
    context = ssl.create_default_context(cafile=str(cert))
    received = bytearray()
    raw = socket.create_connection(address, timeout=20)
    # Lockstep writes: without NODELAY each waits out a delayed ACK.
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        shown = tls.getpeercert(binary_form=True) or b""
        for start in range(0, len(PATTERN), 65536):
            tls.sendall(PATTERN[start : start + 65536])
            while len(received) < min(start + 65536, len(PATTERN)):
                chunk = tls.recv(65536)
                if not chunk:
                    return shown, bytes(received)
                received.extend(chunk)
    return shown, bytes(received)


async def test_tls_passes_through_untouched(
    net: Any, tmp_path: Path, data_plane: dict[str, str]
) -> None:
    cert, key = make_certificate(tmp_path)
    backend = TlsEcho(cert, key)
    try:
        async with net.loopback() as lab:
            daemon = await lab.daemon([backend.address], **data_plane)
            for _ in range(2):
                shown, echoed = await anyio.to_thread.run_sync(
                    tls_round_trip, daemon.listen_address, cert
                )
                expected = ssl.PEM_cert_to_DER_cert(cert.read_text())
                assert hashlib.sha256(shown).digest() == hashlib.sha256(expected).digest()
                assert len(echoed) == len(PATTERN)
                assert hashlib.sha256(echoed).digest() == hashlib.sha256(PATTERN).digest()
    finally:
        backend.close()
    assert backend.errors == []
