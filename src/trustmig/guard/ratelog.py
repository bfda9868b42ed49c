"""Log lines about refused peers, rate-limited: a flood must not become a log flood.

Every refusal is counted by the guard (``trustmig guard show``); the log only needs enough lines
to show what is happening. Each key gets ``burst`` lines per ``interval_s``; further ones are
counted and summarised in the next line that is written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class Throttle:
    """``burst`` events per ``interval_s`` per key; the rest are counted, not acted on."""

    def __init__(
        self, *, burst: int = 5, interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._burst = burst
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}  # key -> (start, written, dropped)

    def admit(self, key: str) -> int | None:
        """None when ``key`` is over its budget; else how many were suppressed before this one."""
        now = self._clock()
        with self._lock:
            start, written, dropped = self._windows.get(key, (now, 0, 0))
            if now - start >= self._interval:
                start, written = now, 0
            if written >= self._burst:
                self._windows[key] = (start, written, dropped + 1)
                return None
            self._windows[key] = (start, written + 1, 0)
            if len(self._windows) > 1024:  # keys are few (listener x rule); stay bounded anyway
                self._windows.pop(next(iter(self._windows)))
        return dropped


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, **throttle: float) -> None:
        self._log = logger
        self._throttle = Throttle(**throttle)  # type: ignore[arg-type]

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Write ``msg`` unless ``key`` used up its burst in this window; True if written."""
        dropped = self._throttle.admit(key)
        if dropped is None:
            return False
        if dropped:
            msg = f"{msg} (and {dropped} similar lines suppressed)"
        self._log.log(level, msg, *args)
        return True
