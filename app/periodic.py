"""A daemon thread that does one piece of work every few seconds until stopped: the worker process's
background tasks (the stats fold, the spool's drain, the mover of due scheduled jobs) are each one."""

from __future__ import annotations

import threading
from typing import Self


class Periodic:
    """Calls `tick` every `interval` seconds in a daemon thread, from `start` until `stop`. `tick` handles
    its own failures: a periodic task outlives an outage and tries again at its next turn."""

    def __init__(self, interval: float, name: str) -> None:
        self.interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        """Stop after the tick in progress, if any, waiting for it at most `timeout` seconds."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.tick()

    def tick(self) -> None:
        raise NotImplementedError
