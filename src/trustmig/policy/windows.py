"""Maintenance windows such as ``"Mon-Fri 22:00-06:00 UTC"``.

A window names the days on which it *opens*, a start and end time of day and a time zone. A window
whose end is earlier than its start runs across midnight and belongs to the day it opened on:
``"Fri 22:00-06:00 UTC"`` covers Friday 22:00 to Saturday 06:00, not Friday 00:00-06:00. This is
how operators read maintenance slots, and it keeps one window from silently covering two nights.

Grammar (case-insensitive day names)::

    window := DAYS " " HH:MM "-" HH:MM [" " ZONE]
    DAYS   := "daily" | "*" | DAY ("-" DAY)? ("," DAY ("-" DAY)?)*
    DAY    := Mon | Tue | Wed | Thu | Fri | Sat | Sun
    ZONE   := "UTC" (default) | an IANA zone name such as "Europe/Berlin"

Ranges may wrap the week (``Fri-Mon``). ``24:00`` is accepted as an end time; start and end may not
be equal (use ``00:00-24:00`` for a whole day).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME_RE = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")
_EXAMPLE = 'e.g. "Mon-Fri 22:00-06:00 UTC"'


@dataclass(frozen=True)
class TimeWindow:
    """A parsed window; ``days`` are weekday numbers (Monday = 0) on which the window opens."""

    text: str
    days: frozenset[int]
    start_minute: int
    end_minute: int
    zone: tzinfo

    def contains(self, when: datetime) -> bool:
        """Whether the aware instant ``when`` falls inside this window."""
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError("time must be timezone-aware")
        local = when.astimezone(self.zone)
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start_minute < self.end_minute:
            return day in self.days and self.start_minute <= minute < self.end_minute
        # Across midnight: the evening part belongs to today, the morning part to yesterday.
        if day in self.days and minute >= self.start_minute:
            return True
        return (day - 1) % 7 in self.days and minute < self.end_minute


_FULL_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _parse_day(token: str, text: str) -> int:
    name = token.strip().lower()
    if name in DAY_NAMES:
        return DAY_NAMES.index(name)
    if name in _FULL_NAMES:
        return _FULL_NAMES.index(name)
    raise ValueError(
        f"window {text!r}: unknown day {token.strip()!r}; use Mon, Tue, Wed, Thu, Fri, Sat, Sun"
    )


def _parse_days(spec: str, text: str) -> frozenset[int]:
    if spec.lower() in ("daily", "*"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in spec.split(","):
        if not part.strip():
            raise ValueError(f"window {text!r}: empty day in {spec!r}; {_EXAMPLE}")
        if "-" in part:
            first_s, _, last_s = part.partition("-")
            first, last = _parse_day(first_s, text), _parse_day(last_s, text)
            day = first
            days.add(day)
            while day != last:
                day = (day + 1) % 7
                days.add(day)
        else:
            days.add(_parse_day(part, text))
    return frozenset(days)


def _parse_zone(name: str, text: str) -> tzinfo:
    if name.upper() in ("UTC", "Z"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"window {text!r}: unknown time zone {name!r}; "
            "use UTC or an IANA name like Europe/Berlin"
        ) from None


def parse_window(text: str) -> TimeWindow:
    """Parse one window string; raises ``ValueError`` with a one-line reason when malformed."""
    if not isinstance(text, str):
        raise ValueError(f"window {text!r}: expected a string, {_EXAMPLE}")
    parts = text.split()
    if len(parts) not in (2, 3):
        raise ValueError(f"window {text!r}: expected 'DAYS HH:MM-HH:MM [ZONE]', {_EXAMPLE}")
    days = _parse_days(parts[0], text)
    match = _TIME_RE.match(parts[1])
    if match is None:
        raise ValueError(f"window {text!r}: times must be HH:MM-HH:MM, {_EXAMPLE}")
    sh, sm, eh, em = (int(g) for g in match.groups())
    if sh > 23 or sm > 59 or em > 59 or eh > 24 or (eh == 24 and em != 0):
        raise ValueError(f"window {text!r}: time out of range (00:00 to 24:00)")
    start, end = sh * 60 + sm, eh * 60 + em
    if start == end:
        raise ValueError(f"window {text!r}: start equals end; use 00:00-24:00 for a whole day")
    zone = _parse_zone(parts[2], text) if len(parts) == 3 else UTC
    return TimeWindow(text=text, days=days, start_minute=start, end_minute=end, zone=zone)
