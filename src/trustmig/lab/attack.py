"""What an attack is, what it reports, and the X.805 cells its evidence covers.

Each attack runs twice, against the unprotected baseline and against trustmig, and each run
returns an :class:`Outcome` built from what was *measured* (bytes seen by a sniffer, the
destination guest's own memory check, which hosts run the VM, an agent's answer), never from
what the attack expected to happen.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from trustmig.lab.targets import LabEnv
from trustmig.lab.x805 import cell


@dataclass
class Outcome:
    compromised: bool
    outcome: str
    evidence: dict[str, Any] = field(default_factory=dict)
    guest: dict[str, Any] | None = None
    duration_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "compromised": self.compromised,
            "outcome": self.outcome,
            "evidence": self.evidence,
            "guest": self.guest,
            "duration_s": self.duration_s,
        }


Run = Callable[[LabEnv], Awaitable[Outcome]]


@dataclass(frozen=True)
class Attack:
    name: str
    title: str
    paper: str
    x805: tuple[tuple[str, str, str], ...]
    baseline: Run
    trustmig: Run

    def cells(self) -> list[dict[str, str]]:
        out = []
        for d, layer, plane in self.x805:
            c = cell(d, layer, plane)  # validates
            out.append({"dimension": c.dimension, "layer": c.layer, "plane": c.plane})
        return out


async def timed(run: Run, env: LabEnv) -> Outcome:
    t0 = time.monotonic()
    out = await run(env)
    out.duration_s = round(time.monotonic() - t0, 2)
    return out
