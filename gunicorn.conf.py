"""gunicorn settings of the `web` process (Procfile; gunicorn also reads this file by itself when started
from the project root, as `flask up` and the benchmark do).

Threaded workers (`gthread`): a request waiting on a slow client, or on the database, holds one of a
process's `WEB_THREADS` threads, not the whole process. gunicorn's threaded worker reads a request's headers
and body with blocking reads and no timeout once its first bytes have arrived, so `ClientTimeoutWorker`
bounds each read and write on a client's socket to `WEB_CLIENT_TIMEOUT` seconds: a client that stalls is
dropped and its thread freed. Its main loop tells the arbiter it is alive whatever its threads do, so a
long request (a large CSV import) is not killed by gunicorn's worker `timeout`. See README, "Processes".

`RedactingLogger` writes gunicorn's lines (its access log, its own) without secrets: Africa's Talking's
callbacks carry WEBHOOK_TOKEN in their URL, Meta's webhook check WHATSAPP_VERIFY_TOKEN (see `app.logs`).
"""

import socket
import struct
import sys

from gunicorn.glogging import Logger
from gunicorn.workers.gthread import ThreadWorker

from app.logs import RedactingFormatter, configured_secrets
from config import Config, SettingsError, check_settings

_SETTINGS = {name: getattr(Config, name) for name in dir(Config) if name.isupper()}

# A bad setting stops gunicorn here, in its master, with one line naming it, before any worker boots.
try:
    check_settings(_SETTINGS)
except SettingsError as exc:
    sys.exit(f"configuration error: {exc}")


def bound_blocking_io(sock: socket.socket, seconds: float) -> None:
    """Make each blocking read or write on `sock` fail after `seconds` without progress (the kernel's
    SO_RCVTIMEO and SO_SNDTIMEO: gunicorn resets Python's own socket timeout before it reads)."""
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class ClientTimeoutWorker(ThreadWorker):
    """gunicorn's threaded worker, with a time limit on each read and write on a client's socket."""

    def handle(self, conn):
        bound_blocking_io(conn.sock, Config.WEB_CLIENT_TIMEOUT)
        return super().handle(conn)


class RedactingLogger(Logger):
    """gunicorn's logger, every line of its error and access logs (whatever their format) without the
    configured secrets or a secret-bearing query parameter's value (`app.logs.redact`)."""

    def setup(self, cfg):
        super().setup(cfg)
        secrets = configured_secrets(_SETTINGS)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(RedactingFormatter(handler.formatter, lambda: secrets))


# A request's thread that waits on the database gives up the interpreter lock, and when the answer comes it
# must get the lock back from whichever thread holds it: with Python's default of 5 ms a click or a primary-key
# read spends more time waiting for the lock than for PostgreSQL (measured: docs/benchmarks.md). Set in the
# master, inherited by the workers it forks.
sys.setswitchinterval(Config.WEB_SWITCH_INTERVAL)
worker_class = ClientTimeoutWorker
threads = Config.WEB_THREADS
logger_class = RedactingLogger
# gunicorn's own lines (booting, signals, workers) at LOG_LEVEL, like the service's: `flask up` runs its
# processes at WARNING, and its terminal then shows none of them. The access log is not affected.
loglevel = Config.LOG_LEVEL.lower()
