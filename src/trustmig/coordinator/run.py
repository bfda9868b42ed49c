"""Gather a cluster-wide view as the operator and carry out a plan, move by move.

The coordinator runs with the operator's own credentials: it asks the vantage agent for its
verified view, every verified peer for its VMs' allowed destinations, and each source agent to
migrate its VMs through the ordinary ``migrate`` call, so every move is decided again by both
ends' policies, attested and audited as if the operator had typed it. Nothing here grants a
right the operator does not hold.

Moves run at most ``per_host`` at a time from one source and ``cluster`` at a time overall
(KubeVirt's defaults: 2 and 5). A move waits for the earlier moves that leave its destination,
because the plan counted the room they free; if one of those failed, the move is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from trustmig.agent.client import ControlClient
from trustmig.coordinator.view import Gathered, combine
from trustmig.placement import Move, Plan
from trustmig.placement.errors import PlacementError

Connect = Callable[[str], Awaitable[ControlClient]]
Event = Callable[[dict[str, Any]], None]
ASK_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Caps:
    """Migrations at once: from one source host, and in the whole cluster."""

    per_host: int = 2
    cluster: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.per_host <= self.cluster:
            raise ValueError("parallel caps: need 1 <= per-host <= cluster-wide")


@dataclass(frozen=True)
class Cluster:
    """What a gather found: the view, the addresses of its hosts, the vantage's verdicts."""

    gathered: Gathered
    addresses: dict[str, str]
    judged: list[dict[str, Any]]


async def _ask(connect: Connect, address: str, host: str | None, op: str,
               params: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """One call to the agent at ``address``; raises PlacementError if it is not ``host``."""
    c = await connect(address)
    try:
        who = (await c.call("ping", {}, timeout=30)).get("host")
        if host is not None and who != host:
            raise PlacementError("wrong_host", f"the agent at {address} is {who!r}, not {host!r}")
        return dict(await c.call(op, params, timeout=ASK_TIMEOUT_S))
    finally:
        await c.close()


async def gather(connect: Connect, vantage_address: str, options: dict[str, Any]) -> Cluster:
    """The verified cluster view, seen from the agent at ``vantage_address``.

    Raises PlacementError (conflict) if two hosts answer for one VM; ControlError if the
    vantage agent refuses (for instance: the caller is no cluster-admin)."""
    params = {"options": options}
    vantage = await _ask(connect, vantage_address, None, "host.placement",
                         {**params, "verify": True})  # fmt: skip
    addresses = {str(vantage["host"]): vantage_address}
    answers: dict[str, dict[str, Any] | str] = {}
    for peer in sorted(vantage.get("verified_guests") or {}):
        address = (vantage.get("peers") or {}).get(peer)
        if address is None:
            answers[peer] = "no control address in the vantage host's config"
            continue
        addresses[peer] = address
        try:
            answers[peer] = await _ask(connect, address, peer, "host.placement", params)
        except Exception as e:  # noqa: BLE001 - an unanswering host's VMs just stay
            answers[peer] = (str(e).splitlines() or [type(e).__name__])[0]
    return Cluster(combine(vantage, answers), addresses, list(vantage.get("judged") or []))


async def execute(
    connect: Connect,
    plan: Plan,
    addresses: dict[str, str],
    options: dict[str, Any],
    caps: Caps,
    on_event: Event | None = None,
) -> list[dict[str, Any]]:
    """Run every move of ``plan``; each outcome is completed, failed or skipped."""
    cluster_gate = asyncio.Semaphore(caps.cluster)
    host_gates = {h: asyncio.Semaphore(caps.per_host) for h in {m.source for m in plan.moves}}
    finished = [asyncio.Event() for _ in plan.moves]
    outcomes: list[dict[str, Any]] = [{} for _ in plan.moves]
    tell = on_event or (lambda ev: None)

    async def one(i: int, m: Move) -> None:
        where = {"vm": m.vm, "source": m.source, "destination": m.destination, "index": i,
                 "of": len(plan.moves)}  # fmt: skip
        try:
            blocker = await _wait_for_room(plan, i, finished, outcomes)
            if blocker is not None:
                outcomes[i] = {
                    **where,
                    "status": "skipped",
                    "error": f"it waits for move {blocker}, which did not complete",
                }
                tell({"event": "move", "state": "skipped", **where})
                return
            async with host_gates[m.source], cluster_gate:
                tell({"event": "move", "state": "started", **where})
                outcomes[i] = {**where, **await _migrate(connect, m, addresses, options)}
                tell({"event": "move", "state": outcomes[i]["status"], **where})
        finally:
            finished[i].set()

    await asyncio.gather(*(one(i, m) for i, m in enumerate(plan.moves)))
    return outcomes


async def _wait_for_room(
    plan: Plan, i: int, finished: list[asyncio.Event], outcomes: list[dict[str, Any]]
) -> int | None:
    """Wait for the earlier moves leaving move ``i``'s destination; the first that failed."""
    dest = plan.moves[i].destination
    for j in range(i):
        if plan.moves[j].source == dest:
            await finished[j].wait()
            if outcomes[j].get("status") != "completed":
                return j
    return None


async def _migrate(
    connect: Connect, m: Move, addresses: dict[str, str], options: dict[str, Any]
) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        c = await connect(addresses[m.source])
        try:
            res = await c.call("migrate", {"vm": m.vm, "to": m.destination, "options": options},
                               timeout=None)  # fmt: skip
        finally:
            with contextlib.suppress(Exception):
                await c.close()
        out = {"status": "completed", "total_ms": res.get("total_ms"),
               "downtime_ms": res.get("downtime_ms")}  # fmt: skip
    except Exception as e:  # noqa: BLE001 - each move's outcome is reported, the rest go on
        out = {"status": "failed", "error": (str(e).splitlines() or [repr(e)])[0]}
    return out | {"seconds": round(time.monotonic() - t0, 2)}
