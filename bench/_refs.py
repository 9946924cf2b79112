"""The processes under test and the backends behind them, each from a generated config.

Backends (started once per run, shared by every proxy):

* nginx serving a tiny HTTP body (one worker, access log off, keep-alive
  unlimited) for the request loads;
* an iperf3 server for the bulk loads;
* ``_holder.py``, an idle TCP backend that holds connections for the memory test.

Proxies (started fresh for every single load, so no load inherits another's
state), each on its own loopback port, forwarding to one backend:

* ``direct``: no proxy, the client talks to the backend (the ceiling);
* HAProxy 2.x, ``mode tcp``, ``nbthread 1``;
* nginx ``stream``, one worker, the module loaded with ``load_module``;
* pproxy 2.7 in tunnel mode, from its own venv without uvloop;
* Loble: ``<python> -m loble run -c <generated TOML>``.

Every idle timeout is one hour, so nothing cuts the held connections.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _procs import Registry, Started, free_port, wait_listening

__all__ = [
    "INSTALL_HINT",
    "PROXY_NAMES",
    "Backends",
    "Holder",
    "Proxy",
    "Running",
    "ensure_pproxy",
    "make_proxies",
]

INSTALL_HINT = "apt-get install haproxy nginx-light libnginx-mod-stream iperf3 wrk"
PPROXY_SPEC = "pproxy>=2.7,<2.8"
PROXY_NAMES = ("direct", "haproxy", "nginx", "pproxy", "loble")
STREAM_MODULE_PATHS = (
    Path("/usr/lib/nginx/modules/ngx_stream_module.so"),
    Path("/usr/share/nginx/modules/ngx_stream_module.so"),
)
IDLE = "1h"
START_TIMEOUT = 15.0


@dataclass
class Running:
    """A proxy instance listening on *port* (``started`` is None for direct)."""

    port: int
    started: Started | None


class Holder:
    """The idle backend, asked over its stdin how many connections it holds."""

    def __init__(self, started: Started, port: int) -> None:
        self.started = started
        self.port = port

    def count(self) -> int:
        stdin, stdout = self.started.popen.stdin, self.started.popen.stdout
        assert stdin is not None and stdout is not None
        stdin.write(b"?\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the idle holder exited: {self.started.tail()}")
        return int(line)


@dataclass
class Backends:
    http_port: int | None = None
    iperf_port: int | None = None
    iperf: Started | None = None
    holder: Holder | None = None


def _nginx_common(workdir: Path, name: str, nofile: int) -> str:
    return (
        "daemon off;\n"
        "master_process on;\n"
        "worker_processes 1;\n"
        f"pid {workdir}/{name}.pid;\n"
        f"error_log {workdir}/{name}-error.log warn;\n"
        f"worker_rlimit_nofile {nofile};\n"
        f"events {{ worker_connections {max(1024, nofile - 100)}; }}\n"
    )


def start_http_backend(reg: Registry, nginx: str, nofile: int) -> int:
    """nginx answering every request with a 6-byte body; return its port."""
    port = free_port()
    workdir = reg.workdir
    temp = "".join(
        f"  {kind}_temp_path {workdir}/tmp-{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = workdir / "backend-nginx.conf"
    conf.write_text(
        _nginx_common(workdir, "backend-nginx", nofile) + "http {\n"
        "  access_log off;\n"
        "  keepalive_requests 100000000;\n"
        "  keepalive_timeout 1h;\n"
        f"{temp}"
        "  server {\n"
        f"    listen 127.0.0.1:{port} backlog=4096;\n"
        "    location / { default_type text/plain; return 200 'hello\\n'; }\n"
        "  }\n"
        "}\n"
    )
    started = reg.start(
        "backend-nginx",
        [
            nginx,
            "-p",
            str(workdir),
            "-e",
            str(workdir / "backend-nginx-stderr.log"),
            "-c",
            str(conf),
        ],
    )
    wait_listening(port, started, START_TIMEOUT)
    return port


def start_iperf_server(reg: Registry, iperf3: str) -> tuple[Started, int]:
    """An iperf3 server; (process, port). A failed test may wedge it: restart it then."""
    port = free_port()
    started = reg.start(
        "iperf3-server",
        [iperf3, "-s", "-B", "127.0.0.1", "-p", str(port), "--rcv-timeout", "15000"],
    )
    wait_listening(port, started, START_TIMEOUT)
    return started, port


def start_holder(reg: Registry) -> Holder:
    script = Path(__file__).with_name("_holder.py")
    started = reg.start(
        "idle-holder", [sys.executable, str(script)], stdin=subprocess.PIPE, stdout_pipe=True
    )
    assert started.popen.stdout is not None
    line = started.popen.stdout.readline()
    if not line.strip().isdigit():
        raise RuntimeError(f"the idle holder did not start: {started.tail()}")
    return Holder(started, int(line))


class Proxy:
    """One proxy under test; :meth:`unavailable` says why it must be skipped, or None."""

    name = "proxy"
    label = "proxy"
    env: dict[str, str] | None = None
    """Added to the proxy's environment (Loble's ``LOBLE_COPY``, say)."""

    def unavailable(self) -> str | None:
        return None

    def version(self) -> str:
        return ""

    def argv(self, workdir: Path, port: int, backend: int, tag: str) -> list[str]:
        raise NotImplementedError

    def start(self, reg: Registry, backend: int, tag: str) -> Running:
        port = free_port()
        started = reg.start(
            f"{self.name}-{tag}", self.argv(reg.workdir, port, backend, tag), env=self.env
        )
        try:
            wait_listening(port, started, START_TIMEOUT)
        except BaseException:
            reg.stop(started)
            raise
        return Running(port, started)

    def stop(self, reg: Registry, running: Running) -> None:
        if running.started is not None:
            reg.stop(running.started)


class Direct(Proxy):
    name = "direct"
    label = "direct (no proxy)"

    def start(self, reg: Registry, backend: int, tag: str) -> Running:
        return Running(backend, None)


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else ""


class HAProxy(Proxy):
    name = "haproxy"
    label = "HAProxy (tcp, 1 thread)"

    def __init__(self, maxconn: int, *, splice: bool = False) -> None:
        self.binary = shutil.which("haproxy")
        self.maxconn = maxconn
        self.splice = splice
        """``option splice-request`` and ``splice-response``: both directions through pipes."""
        if splice:
            self.name = "haproxy-splice"
            self.label = "HAProxy (tcp, 1 thread, splice)"

    def unavailable(self) -> str | None:
        return None if self.binary else f"haproxy not found; install it: {INSTALL_HINT}"

    def version(self) -> str:
        assert self.binary
        return _first_line([self.binary, "-v"])

    def argv(self, workdir: Path, port: int, backend: int, tag: str) -> list[str]:
        assert self.binary
        conf = workdir / f"haproxy-{tag}.cfg"
        conf.write_text(
            "global\n"
            "  nbthread 1\n"
            f"  maxconn {self.maxconn}\n"
            "defaults\n"
            "  mode tcp\n"
            f"  maxconn {self.maxconn}\n"
            "  timeout connect 5s\n"
            f"  timeout client {IDLE}\n"
            f"  timeout server {IDLE}\n"
            + ("  option splice-request\n  option splice-response\n" if self.splice else "")
            + "listen bench\n"
            f"  bind 127.0.0.1:{port}\n"
            f"  server backend 127.0.0.1:{backend}\n"
        )
        return [self.binary, "-db", "-f", str(conf)]


class NginxStream(Proxy):
    name = "nginx"
    label = "nginx stream (1 worker)"

    def __init__(self, nofile: int) -> None:
        self.binary = shutil.which("nginx")
        self.nofile = nofile
        self.module: Path | None = next((p for p in STREAM_MODULE_PATHS if p.exists()), None)
        self.static = False

    def unavailable(self) -> str | None:
        if not self.binary:
            return f"nginx not found; install it: {INSTALL_HINT}"
        if self.module is None:
            self.static = "--with-stream " in _nginx_configure(self.binary) + " "
            if not self.static:
                return f"the nginx stream module is missing; install it: {INSTALL_HINT}"
        return None

    def version(self) -> str:
        assert self.binary
        return _first_line([self.binary, "-v"])

    def argv(self, workdir: Path, port: int, backend: int, tag: str) -> list[str]:
        assert self.binary
        load = f"load_module {self.module};\n" if self.module is not None else ""
        name = f"nginx-stream-{tag}"
        conf = workdir / f"{name}.conf"
        conf.write_text(
            load + _nginx_common(workdir, name, self.nofile) + "stream {\n"
            "  server {\n"
            f"    listen 127.0.0.1:{port} backlog=4096;\n"
            f"    proxy_pass 127.0.0.1:{backend};\n"
            "    proxy_connect_timeout 5s;\n"
            f"    proxy_timeout {IDLE};\n"
            "  }\n"
            "}\n"
        )
        stderr_log = workdir / f"{name}-stderr.log"
        return [self.binary, "-p", str(workdir), "-e", str(stderr_log), "-c", str(conf)]


def _nginx_configure(binary: str) -> str:
    try:
        done = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stderr + done.stdout


def ensure_pproxy(venv: Path) -> tuple[Path | None, str]:
    """pproxy in its own venv (created on first use, without uvloop); (binary, note)."""
    binary = venv / "bin" / "pproxy"
    python = venv / "bin" / "python"
    if not binary.exists():
        print(f"creating {venv} with {PPROXY_SPEC} (once) ...", flush=True)
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", "--clear", str(venv)],
                check=True,
                capture_output=True,
                timeout=120,
            )
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", PPROXY_SPEC],
                check=True,
                capture_output=True,
                timeout=300,
            )
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            return None, (
                f"could not install pproxy into {venv} ({error}; "
                f"{detail.decode(errors='replace').strip()[-200:]}); "
                f"try: python -m venv {venv} && {venv}/bin/pip install '{PPROXY_SPEC}'"
            )
    # pproxy 2.7 breaks at start-up when uvloop is importable.
    probe = subprocess.run(
        [str(python), "-c", "import uvloop"], capture_output=True, timeout=60, check=False
    )
    if probe.returncode == 0:
        return None, (
            f"uvloop is installed in {venv} and pproxy 2.7 fails with it: "
            f"{venv}/bin/pip uninstall -y uvloop"
        )
    return binary, ""


class PProxy(Proxy):
    name = "pproxy"
    label = "pproxy 2.7 (tunnel)"

    def __init__(self, venv: Path, enabled: bool) -> None:
        self.venv = venv
        self.binary: Path | None = None
        self.note = ""
        if enabled:
            self.binary, self.note = ensure_pproxy(venv)

    def unavailable(self) -> str | None:
        return None if self.binary else self.note or "pproxy not installed"

    def version(self) -> str:
        assert self.binary
        return "pproxy " + _first_line([str(self.binary), "--version"]).split()[-1]

    def argv(self, workdir: Path, port: int, backend: int, tag: str) -> list[str]:
        assert self.binary
        return [str(self.binary), "-l", f"tunnel{{127.0.0.1:{backend}}}://127.0.0.1:{port}"]


class Loble(Proxy):
    """Loble as installed for ``python``, or, given ``source``, the checkout at ``source``.

    A ``source`` (``--loble-baseline``) is another checkout of Loble, e.g. a
    ``git worktree`` of an earlier commit: it runs with the same Python and
    dependencies, its own code first on ``PYTHONPATH``, as the subject
    ``loble-base``, so one run measures a change before and after, interleaved.
    """

    name = "loble"
    label = "Loble"

    def __init__(self, python: str, repo: Path, source: Path | None = None) -> None:
        self.python = python
        self.repo = repo
        self.source = source
        if source is not None:
            self.name = "loble-base"
            self.label = f"Loble baseline ({_commit(source)})"
        self.reason: str | None = None
        self.checked = False

    def _python(self) -> list[str]:
        if self.source is None:
            return [self.python]
        # env execs python in place: the pid the RSS test reads is python's.
        return ["env", f"PYTHONPATH={self.source}", self.python]

    def unavailable(self) -> str | None:
        if not self.checked:
            self.checked = True
            self.reason = self._check()
        return self.reason

    def _check(self) -> str | None:
        argv = [*self._python(), "-m", "loble", "run", "--help"]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=60,
                cwd=self.source or self.repo,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"`loble run` is not available yet ({error})"
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [""]
            return f"`loble run` is not available yet ({last[0][:160]})"
        return None

    def version(self) -> str:
        return _first_line([*self._python(), "-m", "loble", "--version"])

    def argv(self, workdir: Path, port: int, backend: int, tag: str) -> list[str]:
        conf = workdir / f"loble-{tag}.toml"
        conf.write_text(
            "# Generated by bench/run.py: one backend, no metrics, quiet logs.\n"
            "[listener]\n"
            f'address = "127.0.0.1:{port}"\n'
            "backlog = 4096\n"
            "\n[timeouts]\n"
            "connect = 5.0\n"
            "idle = 3600.0\n"
            "drain = 1.0\n"
            "\n[metrics]\n"
            "enabled = false\n"
            "\n[logging]\n"
            'level = "warning"\n'
            "\n[[backends]]\n"
            f'address = "127.0.0.1:{backend}"\n'
        )
        return [*self._python(), "-m", "loble", "run", "-c", str(conf)]


def make_proxies(
    *,
    nofile: int,
    haproxy_maxconn: int,
    pproxy_venv: Path,
    loble_python: str,
    repo: Path,
    wanted: tuple[str, ...],
    loble_baseline: Path | None = None,
) -> list[Proxy]:
    """The proxies named in *wanted*, in table order (unavailable ones included);
    with ``loble_baseline``, the baseline checkout right after Loble."""
    builders: dict[str, Callable[[], Proxy]] = {
        "direct": Direct,
        "haproxy": lambda: HAProxy(haproxy_maxconn),
        "nginx": lambda: NginxStream(nofile),
        "pproxy": lambda: PProxy(pproxy_venv, enabled=True),
        "loble": lambda: Loble(loble_python, repo),
    }
    proxies = [builders[name]() for name in PROXY_NAMES if name in wanted]
    if loble_baseline is not None and "loble" in wanted:
        proxies.append(Loble(loble_python, repo, source=loble_baseline))
    return proxies


def _commit(checkout: Path) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except OSError:
        return str(checkout)
    return done.stdout.strip() or str(checkout)


def tool_version(argv: list[str]) -> str:
    return re.sub(r"\s+", " ", _first_line(argv))
