"""The agent's link to the cluster store (``[store] url``): ownership, quarantine, audit head.

Every ``interval_s`` seconds, and at once after a guest starts, arrives or leaves, the agent
makes the store agree with what it really runs (:func:`trustmig.store.reconcile.reconcile`):
its own journal is the truth about its guests, and the store's compare-and-swap on owner and
epoch is the truth about the cluster. A store that is down costs nothing but the records: the
migrations themselves need no cluster decision and go on, and the first round after the store
is back catches up with everything that happened meanwhile.

Quarantine is cluster-wide through the store. A host this agent quarantined is added to the
store (the first reporter's reason stays); a host the store quarantines is quarantined here too
(reason ``cluster: ...``); a quarantine a security administrator lifted anywhere is lifted here
at the next round. Lifting needs the store: a security admin clears once, for every host, so
``clear`` refuses while the store is unreachable rather than leave the others quarantining.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import make_url

from trustmig.agent.vms import HOLDING, VmManager
from trustmig.guard.claims import Quarantine
from trustmig.store import ClusterStore, OwnershipConflict, StoreError, StoreUnavailable
from trustmig.store.reconcile import Conflict, HandOver, HeldVm, Place, Release, reconcile

log = logging.getLogger("trustmig.agent.store")
#: states in which this host owns a guest (before commit, a migrating-out VM is still ours)
OWNED = frozenset({"running", "paused", "migrating-out"})
CLUSTER_PREFIX = "cluster: "
#: how long a changed ownership record settles before a host's report must account for it
KNOWN_GRACE_S = 60.0


@dataclass
class RoundResult:
    """What one round found; applied to local state on the event loop."""

    conflicts: list[Conflict] = field(default_factory=list)
    add_local: dict[str, str] = field(default_factory=dict)
    clear_local: list[str] = field(default_factory=list)
    head_verdict: str = "ok"
    head_detail: str = ""
    written: int = 0


class ClusterSync:
    def __init__(
        self,
        host: str,
        url: str,
        vms: VmManager,
        quarantine: Quarantine,
        audit: Callable[..., None],
        audit_head: Callable[[], tuple[int, str]],
        interval_s: float = 5.0,
    ) -> None:
        self.host = host
        self.url = url
        self.vms = vms
        self.quarantine = quarantine
        self.audit = audit
        self.audit_head = audit_head
        self.interval_s = interval_s
        self.store: ClusterStore | None = None
        self._wake = asyncio.Event()
        self._reported: set[tuple[str, str, int]] = set()
        self._head_reported: str | None = None
        self.status: dict[str, Any] = {"url": _redacted(url), "reachable": None, "error": None,
                                       "last_round": None, "conflicts": []}  # fmt: skip

    # ------------------------------------------------------------------ the loop
    def wake(self) -> None:
        """Run a round soon (a guest started, arrived or left)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except Exception as e:  # noqa: BLE001 - a bug in one round must not end the rounds
                log.exception("cluster store round failed")
                self.status["error"] = f"round failed: {type(e).__name__}: {e}"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()

    async def round(self) -> None:
        held = self._held()
        present = frozenset(v.name for v in self.vms.visible() if v.state in HOLDING)
        local = self.quarantine.snapshot()
        head = await asyncio.to_thread(self.audit_head)
        loop = asyncio.get_running_loop()
        try:
            res = await asyncio.to_thread(self._round_in_store, held, present, local, head)
        except StoreError as e:  # unreachable or refused: the next round tries again
            if self.status["reachable"] is not False:
                log.warning("cluster store: %s (agents carry on; records catch up later)", e)
            self.status |= {"reachable": False, "error": str(e)}
            return
        self.status |= {"reachable": True, "error": None, "last_round": loop.time()}
        self._apply(res)

    def _held(self) -> list[HeldVm]:
        return [HeldVm(v.name, v.spec.tenant, v.epoch, v.spec.memory_mib, v.spec.vcpus)
                for v in self.vms.visible() if v.state in OWNED]  # fmt: skip

    # ------------------------------------------------------------------ in a thread
    def _open(self) -> ClusterStore:
        if self.store is None:
            self.store = ClusterStore.open(self.url)
        return self.store

    def _round_in_store(
        self, held: list[HeldVm], present: frozenset[str], local: dict[str, dict[str, Any]],
        head: tuple[int, str],
    ) -> RoundResult:  # fmt: skip
        store = self._open()
        res = RoundResult()
        recorded = {r.name: r for r in store.vms()}
        for action in reconcile(self.host, held, recorded, present):
            self._write(store, action, res)
        self._quarantine_round(store, local, res)
        check = store.check_audit_head(self.host, *head)
        res.head_verdict = check.verdict
        if check.verdict != "ok":
            res.head_detail = (f"the store saw {self.host}'s audit chain at "
                               f"{check.known_length} events (head {check.known_head[:16]}), "
                               f"it now has {head[0]}")  # fmt: skip
        return res

    def _write(self, store: ClusterStore, action: Any, res: RoundResult) -> None:
        if isinstance(action, Conflict):
            res.conflicts.append(action)
            return
        if isinstance(action, Release):
            res.written += int(store.release(action.vm, self.host, action.epoch))
            return
        vm = action.vm
        try:
            if isinstance(action, HandOver):
                store.hand_over(vm.name, action.from_host, action.from_epoch, self.host, vm.epoch)
            elif isinstance(action, Place):
                store.place(vm.name, vm.tenant, self.host, vm.epoch, vm.mem_mib, vm.vcpus)
            res.written += 1
        except OwnershipConflict as e:
            if e.owner is None:  # the old owner already forgot it: record it here
                store.place(vm.name, vm.tenant, self.host, vm.epoch, vm.mem_mib, vm.vcpus)
                res.written += 1
                return
            res.conflicts.append(Conflict(vm.name, e.owner, e.epoch or 0, str(e)))

    def _quarantine_round(
        self, store: ClusterStore, local: dict[str, dict[str, Any]], res: RoundResult
    ) -> None:
        cluster = store.quarantined()
        cleared = store.cleared_at()
        for host, entry in local.items():
            reason, since = str(entry.get("reason", "")), float(entry.get("since", 0))
            if host in cluster:
                continue
            if reason.startswith(CLUSTER_PREFIX) or cleared.get(host, -1.0) >= since:
                res.clear_local.append(host)
            else:
                store.quarantine(host, reason, by_host=self.host)
        for host, entry in cluster.items():
            if host not in local:
                res.add_local[host] = f"{CLUSTER_PREFIX}{entry['reason']} (by {entry['by_host']})"

    # ------------------------------------------------------------------ on the loop
    def _apply(self, res: RoundResult) -> None:
        for host, reason in res.add_local.items():
            self.quarantine.add(host, reason)
        for host in res.clear_local:
            with contextlib.suppress(Exception):
                self.quarantine.clear(host, "cluster store")
                self.audit("guard.quarantine", outcome="cleared",
                           data={"host": host, "by": "cluster store"})  # fmt: skip
        self.status["conflicts"] = [c.__dict__ for c in res.conflicts]
        for c in res.conflicts:
            key = (c.vm, c.owner, c.epoch)
            if key not in self._reported:
                self._reported.add(key)
                log.error("cluster store conflict: %s", c.why)
                self.audit("store.conflict", vm=c.vm, outcome="conflict",
                           data={"owner": c.owner, "epoch": c.epoch, "why": c.why})  # fmt: skip
        self.status["audit_head"] = res.head_verdict
        if res.head_verdict != "ok" and res.head_detail != self._head_reported:
            self._head_reported = res.head_detail
            log.error("cluster store: audit trail %s: %s", res.head_verdict, res.head_detail)
            self.audit("audit.store_head", outcome=res.head_verdict,
                       data={"detail": res.head_detail})  # fmt: skip

    # ------------------------------------------------------------------ what the API asks
    async def clear(self, host: str, by_user: str) -> dict[str, Any] | None:
        """Lift ``host``'s quarantine cluster-wide (None: the store held none, the lift is
        recorded anyway so that no stale entry returns); raises StoreUnavailable."""

        def lift() -> dict[str, Any] | None:
            store = self._open()
            try:
                return store.clear_quarantine(host, by_user)
            except StoreUnavailable:
                raise
            except StoreError:
                store.note_cleared(host, by_user)
                return None

        return await asyncio.to_thread(lift)

    async def known(self, host: str) -> dict[str, tuple[int, int]]:
        """The VMs the store places on ``host`` (empty when the store is unreachable)."""
        try:
            rows = await asyncio.to_thread(lambda: self._open().vms(host))
        except StoreError:
            return {}
        # a record changed recently may not have reached the host's own view yet (a VM just
        # stopped or handed over): only settled records are held against its report
        settled = time.time() - max(KNOWN_GRACE_S, 3 * self.interval_s)
        return {r.name: (r.mem_mib, r.vcpus) for r in rows if r.updated_at <= settled}

    async def record_reports(self, judged: list[Any]) -> None:
        """Keep each peer's verdict, attested capacity and verified load in the store."""

        def write() -> None:
            store = self._open()
            for j in judged:
                cap = (j.attested.mem_mib, j.attested.vcpus) if j.attested else None
                store.record_attestation(j.host, j.accept, f"{j.rule}: {j.reason}", cap)
                if j.accept and j.report is not None:
                    store.record_load(j.host, j.report.to_json())

        with contextlib.suppress(StoreError):
            await asyncio.to_thread(write)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _redacted(url: str) -> str:
    with contextlib.suppress(Exception):
        return make_url(url).render_as_string(hide_password=True)
    return "(unparsable url)"


__all__ = ["ClusterSync", "StoreUnavailable"]
