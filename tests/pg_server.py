"""A private PostgreSQL cluster for fault tests: stopped, restarted and hung (SIGSTOP) at will, without
touching the shared server. Also a socket that accepts connections and never answers.

The cluster is made once per test session (initdb into a temporary directory) and runs on a free port
of 127.0.0.1 with trust authentication. Run as root, the server runs as the `postgres` OS user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import psycopg

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"  # the server refuses to run as root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One private cluster: `init()` once, then `start()`, `stop()`, `pause()` (hang) and `resume()`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="campaigns-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_server_user = os.geteuid() == 0
        if self._as_server_user:
            account = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", SERVER_USER, "--"] if self._as_server_user else []
        return subprocess.run(prefix + list(args), capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> None:
        """initdb: a new cluster whose superuser is `postgres`, with trust authentication."""
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        # No fsync (a stopped server's writes are still in the OS's cache), but commits wait for their WAL to
        # be written: a test's committed rows survive the crash-like stop, as they would in production.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{self.root}' "
            "-c fsync=off -c full_page_writes=off"
        )
        log = str(self.root / "log")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        """Stop the server at once: clients are disconnected, as in a crash or a failover."""
        self.resume()  # a stopped process cannot shut down
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    @property
    def running(self) -> bool:
        return self._postmaster() is not None

    def _postmaster(self) -> psutil.Process | None:
        pid_file = self.data / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
            return psutil.Process(pid)
        except (FileNotFoundError, IndexError, ValueError, psutil.NoSuchProcess):
            return None

    def _processes(self) -> list[psutil.Process]:
        postmaster = self._postmaster()
        return [postmaster, *postmaster.children(recursive=True)] if postmaster else []

    def pause(self) -> None:
        """Hang the server: SIGSTOP the postmaster and every backend. The kernel still accepts TCP
        connections and acknowledges data, so clients see a server that answers nothing."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo `pause()`."""
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, signum: int) -> None:
        for process in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):  # a backend that ended since it was listed
                process.send_signal(signum)

    def create_database(self, name: str) -> str:
        """Create the database `name` (dropped first if it exists); returns its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        """Stop the server and remove its files."""
        if self.running:
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class SilentServer:
    """A TCP socket that accepts connections (the kernel completes them from the backlog) and never
    reads or answers: what a hung database looks like to a client that connects."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.port = self.socket.getsockname()[1]

    def url(self, database: str = "campaigns") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def close(self) -> None:
        self.socket.close()


def wait_until(predicate, timeout: float, interval: float = 0.1) -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
