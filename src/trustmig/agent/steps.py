"""The spans between a migration's marked steps on one host (monotonic times, in ms).

Both drivers mark their handover's steps (QEMU completed, commit sent and answered on the
source; loaded, commit and running on the destination) so that the result says where the pause
the guest feels goes beyond QEMU's own downtime.
"""

from __future__ import annotations

from collections.abc import Mapping


def span_ms(marks: Mapping[str, float], start: str, end: str) -> float | None:
    """Milliseconds from mark ``start`` to mark ``end``; None unless both were marked."""
    if start not in marks or end not in marks:
        return None
    return round((marks[end] - marks[start]) * 1000, 2)
