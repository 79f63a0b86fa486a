"""A private PgBouncer (Debian's `pgbouncer` package) in transaction mode, in front of a PostgreSQL server,
for the tests of a deploy that pools its connections through it. Run as root, it runs as the `postgres`
OS user (PgBouncer refuses to run as root)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import make_url

SERVER_USER = "postgres"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgBouncer:
    """PgBouncer on a free port of 127.0.0.1, pooling `server_url`'s server in transaction mode with at most
    `pool_size` server connections per database and user, trusting every client."""

    def __init__(self, server_url: str, pool_size: int = 10) -> None:
        self.server = make_url(server_url)
        self.pool_size = pool_size
        self.root = Path(tempfile.mkdtemp(prefix="campaigns-pgbouncer-"))
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    def url(self, database: str) -> str:
        return f"postgresql://{self.server.username}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        executable = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        assert Path(executable).exists(), "PgBouncer is missing (Debian's pgbouncer package: .ci/test installs it)"
        (self.root / "users.txt").write_text(f'"{self.server.username}" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={self.server.host} port={self.server.port or 5432}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.root / 'users.txt'}\n"
            f"pool_mode = transaction\ndefault_pool_size = {self.pool_size}\nmax_client_conn = 500\n"
            f"logfile = {self.root / 'pgbouncer.log'}\n"
        )
        prefix = []
        if os.geteuid() == 0:
            account = pwd.getpwnam(SERVER_USER)
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
            prefix = ["runuser", "-u", SERVER_USER, "--"]
        self.process = subprocess.Popen(
            [*prefix, executable, str(self.root / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                assert self.process.poll() is None, self.log()
                assert time.monotonic() < deadline, "PgBouncer did not listen within 10 s"
                time.sleep(0.1)

    def log(self) -> str:
        path = self.root / "pgbouncer.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
