"""Rate-limited log lines: one line per kind per interval, with the count it stood for.

A cloud outage hits every running request at once; without a limit the log would
carry one identical line per request and per retry. Link loss, reconnects, replays,
fallbacks and rejoins each go through one `RateLimitedLog` kind instead.
"""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """`log(kind, level, msg, *args)` emits at most once per `interval_s` per kind;
    the next emitted line says how many were suppressed in between."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._mu = threading.Lock()

    def log(self, kind: str, level: int, msg: str, *args: object) -> bool:
        """True if the line was written."""
        now = time.monotonic()
        with self._mu:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return False
            self._last[kind] = now
            n = self._suppressed.pop(kind, 0)
        if n:
            msg += f" (+{n} similar in the last {self.interval_s:g} s)"
        self.logger.log(level, msg, *args)
        return True
