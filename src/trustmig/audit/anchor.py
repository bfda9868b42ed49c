"""Anchors of a host's audit trail kept where its own state dir cannot rewind them.

An intruder who can write a host's state dir can delete, empty or cut its audit database and
start a fresh, perfectly valid chain: hashes and signatures prove what is there, not what is
missing. So each agent tells its peers how long its chain is and what its head is (they keep the
highest they were told, in their own journals), and keeps the same note in its own journal. At
start and on ``audit verify`` the trail is held against these witnesses: a chain shorter than a
witness saw was truncated, one whose event at the witnessed length has another hash was
rewritten. This module is the pure comparison; the agent moves the notes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

AnchorCode = Literal["ok", "unanchored", "truncated", "rewritten"]


@dataclass(frozen=True)
class Witness:
    """What ``by`` last saw of this host's chain: its length and the hash of its last event."""

    by: str
    length: int
    head: str


@dataclass(frozen=True)
class AnchorVerdict:
    """``ok``: every witness is consistent with the trail; ``unanchored``: nobody witnessed it
    (nothing to compare with); ``truncated`` / ``rewritten``: history was lost."""

    code: AnchorCode
    detail: str
    witnesses: tuple[Witness, ...] = field(default=())

    @property
    def lost(self) -> bool:
        return self.code in ("truncated", "rewritten")


def check_anchor(
    host: str, length: int, hash_at: Callable[[int], str | None], witnesses: Iterable[Witness]
) -> AnchorVerdict:
    """Hold a trail of ``length`` events (``hash_at(n)`` gives event n's hash) against what its
    witnesses saw; the worst finding decides, the longest witness first."""
    seen = tuple(sorted((w for w in witnesses if w.length > 0), key=lambda w: -w.length))
    if not seen:
        return AnchorVerdict("unanchored", f"no witness of {host}'s audit trail yet")
    for w in seen:
        if w.length > length:
            return AnchorVerdict(
                "truncated",
                f"audit trail of {host} holds {length} events but {w.by} witnessed "
                f"{w.length} (head {w.head[:12]})",
                seen,
            )
    for w in seen:
        have = hash_at(w.length)
        if have != w.head:
            return AnchorVerdict(
                "rewritten",
                f"event {w.length} of {host}'s audit trail has hash "
                f"{(have or 'none')[:12]}, but {w.by} witnessed {w.head[:12]}",
                seen,
            )
    best = seen[0]
    return AnchorVerdict(
        "ok",
        f"consistent with {len(seen)} witness(es), the longest {best.by} at {best.length} events",
        seen,
    )


__all__ = ["AnchorCode", "AnchorVerdict", "Witness", "check_anchor"]
