"""What the dashboard shows, gathered from the agents as the operator.

The dashboard holds no authority of its own: it calls the agents' control API with the
operator's credentials, so each agent shows exactly what that user may see (tenants, roles) and
records every action in its audit trail. An operation the user may not call is shown as such
("not permitted") rather than hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from trustmig.agent.client import ControlClient, ControlError

Connect = Callable[[str], Awaitable[ControlClient]]
#: per-host reads every round; audit.verify walks the whole chain, so it runs less often
READS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("status", "host.status", {}),
    ("migrations", "migration.list", {"limit": 30}),
    ("guard", "guard.show", {}),
    ("quarantine", "guard.quarantine", {}),
)
AUDIT_EVERY_S = 15.0
CALL_TIMEOUT_S = 10.0


@dataclass
class HostRaw:
    """One agent's answers in the last round (``denied``: op -> why, for ops not permitted)."""

    name: str
    address: str
    reachable: bool = False
    error: str | None = None
    answers: dict[str, Any] = field(default_factory=dict)
    denied: dict[str, str] = field(default_factory=dict)
    audit: dict[str, Any] | None = None
    audit_at: float = 0.0
    at: float = 0.0


class ClusterReader:
    """Keeps one :class:`HostRaw` per agent, refreshed every round; discovers peers from each
    agent's status (``peers``: name -> control address)."""

    def __init__(self, connect: Connect, addresses: list[str]) -> None:
        self.connect = connect
        self.seeds = list(addresses)
        self.hosts: dict[str, HostRaw] = {}
        self._clients: dict[str, ControlClient] = {}
        self.rounds = 0

    async def round(self) -> dict[str, HostRaw]:
        """One pass over every known agent; never raises (each host carries its own error)."""
        known = {h.address for h in self.hosts.values()}
        for address in self.seeds:
            if address not in known:
                self.hosts[address] = HostRaw(name=address, address=address)
        for raw in list(self.hosts.values()):
            await self._read(raw)
        self._discover()
        self.rounds += 1
        return self.hosts

    async def _read(self, raw: HostRaw) -> None:
        try:
            c = await self._client(raw.address)
            raw.name = str((await c.call("ping", {}, timeout=CALL_TIMEOUT_S)).get("host"))
            for key, op, params in READS:
                raw.answers[key] = await self._call(c, raw, op, params)
            if time.monotonic() - raw.audit_at > AUDIT_EVERY_S:
                raw.audit = await self._call(c, raw, "audit.verify", {})
                raw.audit_at = time.monotonic()
            raw.reachable, raw.error = True, None
        except Exception as e:  # noqa: BLE001 - an agent that is down is shown as down
            raw.reachable, raw.error = False, (str(e).splitlines() or [type(e).__name__])[0]
            await self._drop(raw.address)
        raw.at = time.time()

    async def _call(self, c: ControlClient, raw: HostRaw, op: str, params: dict[str, Any]) -> Any:
        try:
            res = await c.call(op, params, timeout=CALL_TIMEOUT_S)
        except ControlError as e:
            if e.code == "denied":
                raw.denied[op] = str(e).splitlines()[0]
                return None
            raise
        raw.denied.pop(op, None)
        return res

    def _discover(self) -> None:
        known = {h.address for h in self.hosts.values()}
        names = {h.name for h in self.hosts.values()}
        for raw in list(self.hosts.values()):
            peers = ((raw.answers.get("status") or {}).get("peers")) or {}
            for name, address in sorted(peers.items()):
                if name not in names and address not in known:
                    self.hosts[address] = HostRaw(name=name, address=address)
                    known.add(address)
                    names.add(name)

    async def _client(self, address: str) -> ControlClient:
        c = self._clients.get(address)
        if c is None or c.closed.is_set():
            c = await asyncio.wait_for(self.connect(address), CALL_TIMEOUT_S)
            self._clients[address] = c
        return c

    async def _drop(self, address: str) -> None:
        c = self._clients.pop(address, None)
        if c is not None:
            with contextlib.suppress(Exception):
                await c.close()

    async def call(self, host: str, op: str, params: dict[str, Any],
                   timeout: float | None = None) -> dict[str, Any]:  # fmt: skip
        """An action on ``host``'s agent, on a connection of its own (actions may be long).
        Raises KeyError for a host the dashboard does not know, ControlError if refused."""
        raw = next((h for h in self.hosts.values() if h.name == host), None)
        if raw is None:
            raise KeyError(f"no agent known for host {host!r}")
        c = await self.connect(raw.address)
        try:
            return dict(await c.call(op, params, timeout=timeout))
        finally:
            with contextlib.suppress(Exception):
                await c.close()

    async def close(self) -> None:
        for address in list(self._clients):
            await self._drop(address)
