"""Admission control: how many migrations a host runs at once, and who waits.

Unlimited concurrent migrations let one tenant (or an attacker holding valid credentials)
exhaust a host's memory bandwidth and network; limits follow KubeVirt's per-node default of 2.
Waiting requests are served FIFO within a tenant and round-robin across tenants, so one tenant
queuing many migrations cannot starve the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from trustmig.guard.errors import AdmissionError
from trustmig.timeouts import within

Direction = Literal["in", "out"]
_DIRECTIONS: tuple[Direction, ...] = ("in", "out")
_WORD = {"in": "inbound", "out": "outbound"}
HOUR_S = 3600.0


@dataclass
class AdmissionLimits:
    """Concurrency and rate limits for one host; ``queue_max`` applies per direction."""

    max_outbound_per_host: int = 2
    max_inbound_per_host: int = 2
    max_per_tenant: int = 2
    max_per_vm_per_hour: int = 4
    queue_max: int = 16
    queue_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in (
            "max_outbound_per_host",
            "max_inbound_per_host",
            "max_per_tenant",
            "max_per_vm_per_hour",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AdmissionError(f"{name} is {value!r}; it must be an integer >= 1")
        if not isinstance(self.queue_max, int) or self.queue_max < 0:
            raise AdmissionError(f"queue_max is {self.queue_max!r}; it must be an integer >= 0")
        q = self.queue_timeout_s
        if not isinstance(q, int | float) or not math.isfinite(q) or q <= 0:
            raise AdmissionError(f"queue_timeout_s is {q!r}; it must be a positive number")

    def host_limit(self, direction: Direction) -> int:
        return self.max_inbound_per_host if direction == "in" else self.max_outbound_per_host


@dataclass(frozen=True)
class AdmissionResult:
    """``position`` is 1-based in the fair serving order; ``ticket`` is set while queued."""

    status: Literal["admitted", "queued", "refused"]
    reason: str
    position: int | None
    ticket: str | None


@dataclass
class _Entry:
    migration_id: str
    direction: Direction
    tenant: str
    vm: str
    ticket: str
    enqueued: float
    status: Literal["admitted", "queued", "refused"] = "queued"
    reason: str = ""
    started: float | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)


class _FairQueue:
    """Per-tenant FIFOs served round-robin; ``order`` lists tenants by next turn."""

    def __init__(self) -> None:
        self.by_tenant: dict[str, deque[_Entry]] = {}
        self.order: deque[str] = deque()

    def __len__(self) -> int:
        return sum(len(q) for q in self.by_tenant.values())

    def push(self, entry: _Entry) -> None:
        if entry.tenant not in self.by_tenant:
            self.by_tenant[entry.tenant] = deque()
            self.order.append(entry.tenant)
        self.by_tenant[entry.tenant].append(entry)

    def remove(self, entry: _Entry) -> None:
        q = self.by_tenant.get(entry.tenant)
        if q is None or entry not in q:
            return
        q.remove(entry)
        if not q:
            del self.by_tenant[entry.tenant]
            self.order.remove(entry.tenant)

    def served(self, entry: _Entry) -> None:
        """Remove the head entry of its tenant and send that tenant to the back of the line."""
        self.remove(entry)
        if entry.tenant in self.by_tenant:
            self.order.remove(entry.tenant)
            self.order.append(entry.tenant)

    def fair_order(self) -> list[_Entry]:
        """All waiting entries in the order they would be served with free capacity."""
        queues = [list(self.by_tenant[t]) for t in self.order]
        out: list[_Entry] = []
        for round_ in itertools.zip_longest(*queues):
            out.extend(e for e in round_ if e is not None)
        return out

    def heads(self) -> list[_Entry]:
        return [self.by_tenant[t][0] for t in self.order]


class Admission:
    """Admission control for one host's migrations (pure logic plus an asyncio ``wait``)."""

    def __init__(
        self, limits: AdmissionLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits if limits is not None else AdmissionLimits()
        self._clock = clock
        self._running: dict[str, _Entry] = {}
        self._queues: dict[Direction, _FairQueue] = {d: _FairQueue() for d in _DIRECTIONS}
        self._by_ticket: dict[str, _Entry] = {}
        self._by_migration: dict[str, _Entry] = {}
        self._history: dict[str, deque[float]] = {}

    # ------------------------------------------------------------------ counting
    def _running_count(self, direction: Direction, tenant: str | None = None) -> int:
        return sum(
            1
            for e in self._running.values()
            if e.direction == direction and (tenant is None or e.tenant == tenant)
        )

    def _recent(self, vm: str, now: float) -> int:
        hist = self._history.get(vm)
        if hist is None:
            return 0
        while hist and now - hist[0] >= HOUR_S:
            hist.popleft()
        if not hist:
            del self._history[vm]
            return 0
        return len(hist)

    def _blocker(self, direction: Direction, tenant: str) -> str | None:
        """Why a request cannot start now, or None when it can."""
        limit = self.limits.host_limit(direction)
        running = self._running_count(direction)
        if running >= limit:
            return f"{running} {_WORD[direction]} migrations are running (limit {limit})"
        mine = self._running_count(direction, tenant)
        if mine >= self.limits.max_per_tenant:
            return (
                f"tenant {tenant} has {mine} {_WORD[direction]} migrations running "
                f"(limit {self.limits.max_per_tenant})"
            )
        return None

    # ------------------------------------------------------------------ transitions
    def _start(self, entry: _Entry, now: float, reason: str) -> None:
        entry.status = "admitted"
        entry.reason = reason
        entry.started = now
        self._running[entry.migration_id] = entry
        entry.event.set()

    def _forget(self, entry: _Entry) -> None:
        self._by_ticket.pop(entry.ticket, None)
        self._by_migration.pop(entry.migration_id, None)

    def _pump(self) -> None:
        """Expire stale waiters, then start every waiter that fits, in fair order."""
        now = self._clock()
        for direction in _DIRECTIONS:
            queue = self._queues[direction]
            for entry in queue.fair_order():
                if now - entry.enqueued >= self.limits.queue_timeout_s:
                    queue.remove(entry)
                    entry.status = "refused"
                    entry.reason = (
                        f"refused because migration {entry.migration_id} waited "
                        f"{self.limits.queue_timeout_s:g} s in the queue; retry later"
                    )
                    self._forget(entry)
                    self._by_ticket[entry.ticket] = entry  # keep so wait() can report it
                    entry.event.set()
            progressed = True
            while progressed:
                progressed = False
                for entry in queue.heads():
                    if self._blocker(direction, entry.tenant) is None:
                        queue.served(entry)
                        self._start(entry, now, "admitted after waiting in the queue")
                        progressed = True
                        break

    # ------------------------------------------------------------------ public API
    def request(
        self, direction: Direction, *, tenant: str, vm: str, migration_id: str
    ) -> AdmissionResult:
        """Admit, queue or refuse one migration; the reason says which limit decided."""
        if direction not in _DIRECTIONS:
            raise AdmissionError(f"direction must be 'in' or 'out', got {direction!r}")
        for name, value in (("tenant", tenant), ("vm", vm), ("migration_id", migration_id)):
            if not isinstance(value, str) or not value.strip():
                raise AdmissionError(f"{name} must be a non-empty string, got {value!r}")
        if migration_id in self._by_migration:
            raise AdmissionError(
                f"migration {migration_id} already has an admission request; "
                "release it before requesting again"
            )
        self._pump()
        now = self._clock()
        queue = self._queues[direction]
        waiting_vm = sum(1 for q in self._queues.values() for e in q.fair_order() if e.vm == vm)
        running_vm = sum(1 for e in self._running.values() if e.vm == vm)
        done = self._recent(vm, now)
        count = done + running_vm + waiting_vm
        if count >= self.limits.max_per_vm_per_hour:
            pending = f", {running_vm + waiting_vm} more under way" if count > done else ""
            return AdmissionResult(
                "refused",
                f"refused because VM {vm} already migrated {done} times in the last hour"
                f"{pending} (limit {self.limits.max_per_vm_per_hour})",
                None,
                None,
            )
        ticket = f"adm-{secrets.token_hex(8)}"
        entry = _Entry(migration_id, direction, tenant, vm, ticket, enqueued=now)
        blocker = self._blocker(direction, tenant)
        if blocker is None:
            self._by_migration[migration_id] = entry
            self._by_ticket[ticket] = entry
            self._start(
                entry,
                now,
                f"admitted: {self._running_count(direction)} "
                f"{_WORD[direction]} running (limit "
                f"{self.limits.host_limit(direction)})",
            )
            return AdmissionResult("admitted", entry.reason, None, ticket)
        if len(queue) >= self.limits.queue_max:
            return AdmissionResult(
                "refused",
                f"refused because {blocker} and the {_WORD[direction]} queue is full "
                f"({len(queue)} waiting, limit {self.limits.queue_max}); retry later",
                None,
                None,
            )
        queue.push(entry)
        self._by_migration[migration_id] = entry
        self._by_ticket[ticket] = entry
        position = queue.fair_order().index(entry) + 1
        entry.reason = f"queued because {blocker}; position {position}"
        return AdmissionResult("queued", entry.reason, position, ticket)

    def status(self, ticket: str) -> AdmissionResult:
        """Current state of a ticket (runs expiry and promotion first)."""
        self._pump()
        entry = self._by_ticket.get(ticket)
        if entry is None:
            raise AdmissionError(
                f"admission ticket {ticket!r} is unknown; use the ticket returned by request()"
            )
        if entry.status == "queued":
            position = self._queues[entry.direction].fair_order().index(entry) + 1
            blocker = self._blocker(entry.direction, entry.tenant) or "earlier requests wait"
            return AdmissionResult(
                "queued", f"queued because {blocker}; position {position}", position, ticket
            )
        if entry.status == "refused":
            self._by_ticket.pop(ticket, None)
        return AdmissionResult(entry.status, entry.reason, None, ticket)

    async def wait(self, ticket: str, timeout: float) -> AdmissionResult:
        """Wait up to ``timeout`` seconds for a queued ticket to be admitted (or expire).

        Returns the ticket's state at the end: ``admitted``, ``refused`` (queue timeout) or
        still ``queued`` with its current position if ``timeout`` ran out first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            result = self.status(ticket)
            if result.status != "queued":
                return result
            entry = self._by_ticket[ticket]
            left = deadline - loop.time()
            if left <= 0:
                return result
            queue_left = entry.enqueued + self.limits.queue_timeout_s - self._clock()
            entry.event.clear()
            with contextlib.suppress(TimeoutError):
                await within(entry.event.wait(), max(0.0, min(left, queue_left)))

    def release(self, migration_id: str, *, completed: bool = False) -> None:
        """A migration finished (or was abandoned while queued): free its slot.

        Only a ``completed`` migration counts against the VM's hourly limit: a refused or
        aborted one (a peer's failed prepare, an attack) must not use up the owner's quota.
        """
        entry = self._by_migration.get(migration_id)
        if entry is None:
            raise AdmissionError(
                f"migration {migration_id} holds no admission slot and is not queued; "
                "release only ids that request() admitted or queued"
            )
        if entry.status == "queued":
            self._queues[entry.direction].remove(entry)
            entry.status = "refused"
            entry.reason = f"refused because migration {migration_id} was released while queued"
            entry.event.set()
        if self._running.pop(migration_id, None) is not None and completed:
            self._history.setdefault(entry.vm, deque()).append(self._clock())
        self._forget(entry)
        self._pump()

    def snapshot(self) -> dict[str, Any]:
        """JSON-able view: limits, running migrations and queues in fair order."""
        self._pump()
        now = self._clock()

        def view(e: _Entry) -> dict[str, Any]:
            return {
                "migration_id": e.migration_id,
                "tenant": e.tenant,
                "vm": e.vm,
                "since": e.started if e.started is not None else e.enqueued,
                "age_s": now - (e.started if e.started is not None else e.enqueued),
            }

        return {
            "limits": asdict(self.limits),
            "running": {
                d: [view(e) for e in self._running.values() if e.direction == d]
                for d in _DIRECTIONS
            },
            "queued": {
                d: [
                    {**view(e), "position": i + 1}
                    for i, e in enumerate(self._queues[d].fair_order())
                ]
                for d in _DIRECTIONS
            },
        }
