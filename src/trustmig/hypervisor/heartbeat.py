"""Judge guest continuity from the heartbeats seen on the source and destination consoles.

QEMU's reported downtime understates the pause the guest feels, so trustmig measures it from the
guest itself: the largest gap between consecutive heartbeats (host receive time) across both
consoles, and whether the sequence went on without reset or repeat.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Continuity:
    gap_ms: float | None
    continuous: bool
    source_last: int | None
    destination_first: int | None
    destination_count: int
    reason: str | None

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def analyse(
    source: Sequence[tuple[int, float]], destination: Sequence[tuple[int, float]]
) -> Continuity:
    """``source``/``destination``: (seq, host_ts) in arrival order.

    Continuous means: each console's sequence strictly increases by one, the destination starts
    after the source's last heartbeat with at most one line lost at the switch (a line can be
    split across the two consoles), and the destination produced heartbeats at all.
    """
    if not destination:
        return Continuity(
            None,
            False,
            source[-1][0] if source else None,
            None,
            0,
            "no heartbeat on the destination",
        )
    reason = None
    for name, hbs in (("source", source), ("destination", destination)):
        for (a, _), (b, _) in itertools.pairwise(hbs):
            if b != a + 1:
                reason = reason or f"{name} heartbeat {a} followed by {b}"
    s_last = source[-1][0] if source else None
    d_first = destination[0][0]
    if s_last is not None:
        if d_first <= s_last:
            reason = reason or f"destination restarted at {d_first} after source reached {s_last}"
        elif d_first > s_last + 2:
            reason = reason or f"heartbeats {s_last + 1}..{d_first - 1} lost at the switch"
    merged = sorted([*source, *destination], key=lambda h: h[1])
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(merged)]
    return Continuity(
        round(max(gaps) * 1000, 1) if gaps else None,
        reason is None,
        s_last,
        d_first,
        len(destination),
        reason,
    )
