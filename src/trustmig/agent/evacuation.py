"""``host.evacuate``: empty this host for maintenance, trusting only what was verified.

The host being emptied plans its own evacuation, because it holds what the plan must respect:
its VMs' signed policies and the caller's rights over each of them. For every VM and every peer
it asks the same migrate-out decision a migration would (``Governance.decide_out``, with the
caller as the user), so the planner's allowed hosts are exactly the ones the migrations will be
allowed to reach. Peers' capacity and load come only from their measured, signed and TPM-quoted
reports (:class:`~trustmig.agent.host_report.ClusterLoads`); a peer whose report fails is left out
of the plan, and one that lied is quarantined. The moves then run through the ordinary migrate
path (policy on both ends, attestation, audit), at most ``parallel`` at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from trustmig.agent.capacity import host_capacity
from trustmig.agent.control import Operations, Request
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.governance import Governance
from trustmig.agent.host_report import ClusterLoads, HostReporter, ReportJudgement
from trustmig.agent.neighbours import policy_of
from trustmig.agent.tenancy import ownership_of
from trustmig.agent.vms import ManagedVM, VmManager
from trustmig.config import HostConfig
from trustmig.hypervisor.migration import MigrationOptions
from trustmig.placement import ClusterView, Goal, HostFacts, Plan, VmFacts, plan, violations
from trustmig.placement.wire import host_to_json, vm_to_json
from trustmig.policy import HostLabels

#: KubeVirt's default: at most two outbound migrations per node at once
DEFAULT_PARALLEL = 2
MAX_PARALLEL = 5
#: a VM that arrived by migration this recently is not moved again by balance (no ping-pong)
COOLDOWN_S = 300.0
Migrate = Callable[[str, str, MigrationOptions, Any, Any], Awaitable[dict[str, Any]]]


def peer_facts(j: ReportJudgement, labels: HostLabels) -> tuple[HostFacts, list[VmFacts]]:
    """A verified peer as the planner sees it: attested capacity, measured guests (which stay
    put: they are counted, never moved by this host's plan). Raises ValueError for a report
    that was not accepted."""
    if j.report is None or j.attested is None:
        raise ValueError(f"host {j.host}: only an accepted report becomes planner facts")
    host = HostFacts(
        name=j.host, mem_mib=max(1, j.attested.mem_mib), vcpus=max(1, j.attested.vcpus),
        country=labels.country, zone=labels.zone, security_level=labels.security_level,
        cpu_used=j.report.host_cpu_cores,
    )  # fmt: skip
    guests = [
        VmFacts(
            name=f"{j.host}/{v.name}",
            tenant=v.tenant,
            host=j.host,
            mem_mib=v.mem_mib,
            vcpus=v.vcpus,
            cpu_used=v.cpu_cores,
            movable=False,
            neighbours=v.neighbours if v.neighbours in ("any", "tenant", "none") else "none",
            never_with=frozenset(v.never_with),
        )
        for v in j.report.vms
    ]
    return host, guests


class Evacuation:
    def __init__(
        self,
        cfg: HostConfig,
        vms: VmManager,
        gov: Governance,
        loads: ClusterLoads,
        reporter: HostReporter,
        migrate: Migrate,
        audit: Callable[..., None],
    ) -> None:
        self.cfg = cfg
        self.vms = vms
        self.gov = gov
        self.loads = loads
        self.reporter = reporter
        self.migrate = migrate
        self.audit = audit
        self._running = False

    def register(self, ops: Operations) -> None:
        ops.add("host.evacuate", self.evacuate_op, roles=("cluster-admin",))
        ops.add("host.placement", self.placement_op, roles=("cluster-admin",))

    async def placement_op(self, req: Request) -> dict[str, Any]:
        """This host's part of a cluster-wide plan (``trustmig balance``, ``consolidate``).

        Every host answers with its own VMs and, for each, the peers its migrate-out policy
        allows for the caller. With ``verify``, the host also answers as the plan's vantage
        point: itself and the peers whose measured load it verified (attested capacity, and the
        guests each report shows), which is all the coordinator plans on."""
        opts = MigrationOptions.model_validate(req.params.get("options") or {})
        peers = sorted(self.cfg.peers)
        guests, refused = self._own_vms(req.peer, peers, opts, accepting=True)
        doc: dict[str, Any] = {
            "host": self.cfg.name,
            "vms": [vm_to_json(g) for g in guests],
            "refused": refused,
            "peers": {name: p.control for name, p in sorted(self.cfg.peers.items())},
        }
        if req.params.get("verify"):
            judged = await self.loads.ask_all()
            hosts = [self._own_facts(accepting=True)]
            verified: dict[str, list[dict[str, Any]]] = {}
            for j in self._trusted(judged):
                h, g = peer_facts(j, self.gov.peer_labels(j.host))
                hosts.append(h)
                verified[j.host] = [vm_to_json(v) for v in g]
            doc |= {"hosts": [host_to_json(h) for h in hosts], "verified_guests": verified,
                    "judged": self._judged_json(judged)}  # fmt: skip
        return doc

    async def evacuate_op(self, req: Request) -> dict[str, Any]:
        dry_run = bool(req.params.get("dry_run", False))
        parallel = req.params.get("parallel", DEFAULT_PARALLEL)
        if not isinstance(parallel, int) or not 1 <= parallel <= MAX_PARALLEL:
            raise RequestError(f"host.evacuate: parallel must be 1-{MAX_PARALLEL}", Code.INVALID)
        opts = MigrationOptions.model_validate(req.params.get("options") or {})
        if self._running:
            raise RequestError(f"{self.cfg.name} is already being evacuated", Code.BUSY)
        self._running = True
        try:
            return await self._evacuate(req, dry_run, parallel, opts)
        finally:
            self._running = False

    async def _evacuate(
        self, req: Request, dry_run: bool, parallel: int, opts: MigrationOptions
    ) -> dict[str, Any]:
        judged = await self.loads.ask_all()
        view, refused = self.view(req.peer, judged, opts)
        p = plan(view, Goal.EVACUATE, host=self.cfg.name)
        broken = violations(view, p)
        if broken:  # the planner's own contract: never run a plan that breaks a rule
            raise RequestError(f"evacuation plan breaks {broken[0].code}: {broken[0].why}",
                               Code.INTERNAL)  # fmt: skip
        doc = self._document(p, refused, judged)
        self.audit("host.evacuate", user=req.peer.name,
                   outcome="planned" if dry_run else "started",
                   data={"moves": len(p.moves), "stuck": len(doc["stuck"])})  # fmt: skip
        if dry_run:
            return doc
        doc["outcomes"] = await self._run(p, req, parallel, opts)
        done = sum(1 for o in doc["outcomes"] if o["status"] == "completed")
        doc["remaining"] = sorted(v.name for v in self.vms.visible())
        self.audit("host.evacuate", user=req.peer.name, outcome="finished",
                   data={"completed": done, "remaining": len(doc["remaining"])})  # fmt: skip
        return doc

    def view(
        self, user: Any, judged: list[ReportJudgement], opts: MigrationOptions
    ) -> tuple[ClusterView, list[dict[str, Any]]]:
        """The verified view, and the VMs no trusted peer may take (with the first denial)."""
        hosts: list[HostFacts] = [self._own_facts(accepting=False)]
        guests: list[VmFacts] = []
        for j in self._trusted(judged):
            h, g = peer_facts(j, self.gov.peer_labels(j.host))
            hosts.append(h)
            guests.extend(g)
        own, refused = self._own_vms(user, [h.name for h in hosts[1:]], opts, accepting=False)
        return ClusterView(tuple(hosts), tuple(guests + own)), refused

    def _trusted(self, judged: list[ReportJudgement]) -> list[ReportJudgement]:
        return [j for j in judged
                if j.accept and self.loads.quarantine.is_quarantined(j.host) is None]  # fmt: skip

    def _own_vms(
        self, user: Any, peers: list[str], opts: MigrationOptions, *, accepting: bool
    ) -> tuple[list[VmFacts], list[dict[str, Any]]]:
        """This host's VMs with the peers each may go to, and those that may go nowhere."""
        use = {g.name: g for g in self.reporter.guests()}
        guests: list[VmFacts] = []
        refused: list[dict[str, Any]] = []
        now = time.time()
        for vm in sorted(self.vms.visible(), key=lambda v: v.name):
            allowed, denial = self._allowed(user, vm, peers, opts)
            if not allowed and vm.state == "running":
                why = denial or "no trusted peer reported a verified load"
                refused.append({"vm": vm.name, "host": self.cfg.name, "code": "no_allowed_host",
                                "why": why})  # fmt: skip
            measured = use.get(vm.name)
            rules = policy_of(self.gov.vm_policy_json(vm.name))
            near = rules.co_residency if rules is not None else None
            cooling = accepting and vm.arrived_by is not None and now - vm.created_at < COOLDOWN_S
            guests.append(VmFacts(
                name=vm.name, tenant=vm.spec.tenant, host=self.cfg.name,
                mem_mib=vm.spec.memory_mib, vcpus=vm.spec.vcpus,
                cpu_used=measured.cpu_cores if measured else 0.0,
                allowed_hosts=frozenset(allowed), cooling=cooling,
                neighbours=near.neighbours if near else "any",
                never_with=frozenset(near.never_with_tenants if near else ()),
                movable=bool(allowed) and vm.state == "running" and vm.migration is None,
            ))  # fmt: skip
        return guests, refused

    def _own_facts(self, *, accepting: bool) -> HostFacts:
        cap = host_capacity(self.cfg)
        hp = self.gov.host_policy
        labels = hp.labels if hp is not None else HostLabels(country="ZZ")
        cpu = sum(g.cpu_cores for g in self.reporter.guests())
        return HostFacts(self.cfg.name, max(1, cap.mem_mib), max(1, cap.vcpus),
                         country=labels.country, zone=labels.zone,
                         security_level=labels.security_level, accepts=accepting,
                         cpu_used=round(cpu, 3))  # fmt: skip

    def _allowed(
        self, user: Any, vm: ManagedVM, peers: list[str], opts: MigrationOptions
    ) -> tuple[list[str], str | None]:
        allowed: list[str] = []
        denial = None
        for peer in peers:
            d = self.gov.decide_out(user, ownership_of(vm), peer, opts.mode == "postcopy")
            if d.allow:
                allowed.append(peer)
            elif denial is None:
                denial = f"{peer}: {d.rule}: {d.reason}"
        return allowed, denial

    def _document(
        self, p: Plan, refused: list[dict[str, Any]], judged: list[ReportJudgement]
    ) -> dict[str, Any]:
        doc = p.to_json()
        pinned = {r["vm"] for r in refused}
        doc["stuck"] = refused + [s for s in doc["stuck"] if s["vm"] not in pinned]
        doc["host"] = self.cfg.name
        doc["hosts"] = self._judged_json(judged)
        return doc

    def _judged_json(self, judged: list[ReportJudgement]) -> list[dict[str, Any]]:
        return [{"host": j.host, "accept": j.accept, "rule": j.rule, "reason": j.reason,
                 "quarantined": self.loads.quarantine.is_quarantined(j.host)}
                for j in judged]  # fmt: skip

    async def _run(
        self, p: Plan, req: Request, parallel: int, opts: MigrationOptions
    ) -> list[dict[str, Any]]:
        gate = asyncio.Semaphore(parallel)

        async def one(i: int) -> dict[str, Any]:
            m = p.moves[i]

            async def tell(state: str, **fields: Any) -> None:
                where = {"vm": m.vm, "destination": m.destination, "index": i, "of": len(p.moves)}
                await req.emit({"event": "evacuate", "state": state, **where, **fields})

            async def progress(ev: dict[str, Any]) -> None:  # the migration's own events
                await req.emit({**ev, "vm": m.vm})

            async with gate:
                t0 = time.monotonic()
                await tell("started")
                try:
                    res = await self.migrate(m.vm, m.destination, opts, req.peer, progress)
                    out = {"status": "completed", "total_ms": res.get("total_ms"),
                           "downtime_ms": res.get("downtime_ms")}  # fmt: skip
                except Exception as e:  # noqa: BLE001 - each move's outcome is reported
                    out = {"status": "failed", "error": (str(e).splitlines() or [repr(e)])[0]}
                out |= {"vm": m.vm, "destination": m.destination,
                        "seconds": round(time.monotonic() - t0, 2)}  # fmt: skip
                await tell(str(out["status"]), seconds=out["seconds"])
                return out

        return list(await asyncio.gather(*(one(i) for i in range(len(p.moves)))))
