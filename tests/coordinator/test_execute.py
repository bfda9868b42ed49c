"""Carrying out a plan: caps per source and cluster-wide, a move waits for the moves that free
its destination, and one that depends on a failed move is skipped (the VM stays)."""

from __future__ import annotations

import asyncio
from typing import Any

from trustmig.agent.client import ControlError
from trustmig.coordinator import Caps, execute
from trustmig.placement import Figures, Goal, Move, Plan

NONE = Figures(0, 0, 0, 0.0, 0.0, 0.0)


class FakeAgent:
    """A source agent's ``migrate`` (a unit-test stand-in: the VM tests run the real one)."""

    def __init__(self, log: list[tuple[str, str]], running: dict[str, int], fail: set[str]):
        self.log, self.running, self.fail = log, running, fail

    async def call(self, op: str, params: dict[str, Any], **_: Any) -> dict[str, Any]:
        vm = params["vm"]
        self.running["now"] += 1
        self.running["peak"] = max(self.running["peak"], self.running["now"])
        self.log.append(("start", vm))
        await asyncio.sleep(0.02)
        self.running["now"] -= 1
        self.log.append(("end", vm))
        if vm in self.fail:
            raise ControlError("destination refused: no room", "refused")
        return {"total_ms": 20, "downtime_ms": 1}

    async def close(self) -> None:
        return None


def _run(moves: list[Move], caps: Caps, fail: frozenset[str] = frozenset()) -> tuple[Any, ...]:
    log: list[tuple[str, str]] = []
    running = {"now": 0, "peak": 0}
    events: list[dict[str, Any]] = []

    async def dial(address: str) -> Any:
        return FakeAgent(log, running, set(fail))

    p = Plan(Goal.CONSOLIDATE, tuple(moves), (), NONE, NONE)
    addresses = {h: f"{h}:1" for h in "abcdef"}
    outcomes = asyncio.run(execute(dial, p, addresses, {}, caps, events.append))
    return outcomes, log, running["peak"], events


def test_caps_hold_per_source_and_cluster_wide() -> None:
    moves = [Move(f"v{i}", "abc"[i % 3], "d", "") for i in range(9)]
    outcomes, _, peak, _ = _run(moves, Caps(per_host=2, cluster=3))
    assert peak == 3 and all(o["status"] == "completed" for o in outcomes)
    _, _, peak, _ = _run(moves[:4:3], Caps(per_host=1, cluster=5))  # v0, v3: both from a
    assert peak == 1


def test_a_move_waits_for_the_moves_that_free_its_destination() -> None:
    moves = [Move("x", "b", "c", ""), Move("y", "a", "b", "")]
    _, log, _, _ = _run(moves, Caps(per_host=2, cluster=5))
    assert log.index(("end", "x")) < log.index(("start", "y"))


def test_a_move_whose_room_never_came_is_skipped() -> None:
    moves = [Move("x", "b", "c", ""), Move("y", "a", "b", ""), Move("z", "e", "f", "")]
    outcomes, log, _, events = _run(moves, Caps(), fail=frozenset({"x"}))
    status = {o["vm"]: o["status"] for o in outcomes}
    assert status == {"x": "failed", "y": "skipped", "z": "completed"}
    assert ("start", "y") not in log
    assert "no room" in outcomes[0]["error"] and "move 0" in outcomes[1]["error"]
    assert {(e["vm"], e["state"]) for e in events} >= {("y", "skipped"), ("x", "failed")}
