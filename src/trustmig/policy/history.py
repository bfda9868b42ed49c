"""Migration history for the per-VM rate limit (``migrate.max_per_hour``).

A rate limit bounds how often a VM's memory crosses the network, which bounds the exposure of a
guest to a compromised path and stops a stolen operator credential from bouncing a VM around.
The history is kept in memory and, when given a path, persisted as JSON (written to a temporary
file and renamed, so a crash never leaves a truncated file that would reset the limit).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

from trustmig.policy.errors import PolicyError

RETENTION = timedelta(hours=1)


def _require_aware(when: datetime, what: str) -> None:
    if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise PolicyError(f"{what} must be a timezone-aware datetime, e.g. datetime.now(UTC)")


class MigrationHistory:
    """When each VM was last migrated; thread-safe."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._times: dict[str, list[datetime]] = defaultdict(list)
        if self._path is not None and self._path.exists():
            self._load(self._path)

    def _load(self, path: Path) -> None:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("top level is not an object")
            for vm, stamps in obj.items():
                if not isinstance(vm, str) or not isinstance(stamps, list):
                    raise ValueError(f"entry {vm!r} is not a list of timestamps")
                for stamp in stamps:
                    when = datetime.fromisoformat(stamp)
                    _require_aware(when, f"timestamp {stamp!r}")
                    self._times[vm].append(when)
        except (OSError, ValueError, TypeError) as exc:
            raise PolicyError(
                f"{path}: migration history is unreadable ({exc}); restore it or remove it "
                "(removing resets rate limits)"
            ) from None

    def record(self, vm: str, when: datetime) -> None:
        """Note that ``vm`` was migrated at ``when`` (and persist, if a path was given)."""
        _require_aware(when, "migration time")
        with self._lock:
            cutoff = when - RETENTION
            self._times[vm] = [t for t in self._times[vm] if t > cutoff] + [when]
            if self._path is not None:
                self._save(self._path, when)

    def count_last_hour(self, vm: str, now: datetime) -> int:
        """Migrations of ``vm`` in the hour ending at ``now`` (``now - 1h < t <= now``)."""
        _require_aware(now, "now")
        start = now - RETENTION
        with self._lock:
            return sum(1 for t in self._times.get(vm, ()) if start < t <= now)

    def _save(self, path: Path, now: datetime) -> None:
        cutoff = now - RETENTION
        kept = {
            vm: [t.isoformat() for t in stamps if t > cutoff] for vm, stamps in self._times.items()
        }
        kept = {vm: stamps for vm, stamps in kept.items() if stamps}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(kept, handle, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
