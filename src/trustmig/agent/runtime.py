"""What migrations need of their host, behind narrow interfaces.

:class:`HostServices` is the set of capabilities a migration driver may use (journal, audit,
VMs, admission, the channel's security, decisions, peers, relays, QEMU factory): each is a small
object or function, and none is the agent itself. :class:`AdmissionGate` wraps the guard's
admission control with the audit records the agent writes for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmig.agent.client import ControlClient
from trustmig.agent.datapath import ChannelSecurity
from trustmig.agent.diskkeys import DiskKeys
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.governance import Governance
from trustmig.agent.journal import Journal
from trustmig.agent.neighbours import Neighbours
from trustmig.agent.vms import AuditFn, QemuFactory, VmManager
from trustmig.config import HostConfig
from trustmig.guard import Admission
from trustmig.guard.claims import Quarantine
from trustmig.pki.authority import Credentials
from trustmig.relay.client import RelayRecord, spawn

log = logging.getLogger("trustmig.agent")


class AdmissionGate:
    """Admission control (caps per host, tenant, VM and hour; a fair queue), audited."""

    def __init__(self, admission: Admission, audit: AuditFn, wait_s: float) -> None:
        self.admission = admission
        self.audit = audit
        self.wait_s = wait_s

    async def admit(self, direction: str, *, tenant: str, vm: str, migration_id: str) -> None:
        res = self.admission.request(
            direction,  # type: ignore[arg-type]
            tenant=tenant,
            vm=vm,
            migration_id=migration_id,
        )
        if res.status in ("refused", "queued"):
            self.audit("admission", vm=vm, migration_id=migration_id, outcome=res.status,
                       data={"direction": direction, "reason": res.reason})  # fmt: skip
        if res.status == "refused":
            raise RequestError(f"migration {res.reason}", Code.REFUSED)
        if res.status == "queued":
            assert res.ticket is not None
            res = await self.admission.wait(res.ticket, self.wait_s)
            if res.status != "admitted":
                raise RequestError(f"migration {res.reason}", Code.REFUSED)

    def readmit(self, direction: str, *, tenant: str, vm: str, migration_id: str) -> None:
        """A migration found in the journal at start keeps counting against the limits."""
        with contextlib.suppress(Exception):
            self.admission.request(
                direction,  # type: ignore[arg-type]
                tenant=tenant,
                vm=vm,
                migration_id=migration_id,
            )

    def release(self, migration_id: str, *, completed: bool = False) -> None:
        with contextlib.suppress(Exception):
            self.admission.release(migration_id, completed=completed)


@dataclass
class HostServices:
    """The capabilities of the host that migrations use."""

    cfg: HostConfig
    journal: Journal
    audit: AuditFn
    vms: VmManager
    admission: AdmissionGate
    security: ChannelSecurity
    quarantine: Quarantine
    gov: Governance
    creds: Credentials
    host_key_pem: bytes
    connect_peer: Callable[[str], Awaitable[ControlClient]]
    make_qemu: QemuFactory
    sock_root: Path
    run_dir: Path
    data_advertise: Callable[[], str]
    attesting: bool
    #: Builds (once) the guest image and returns its key, which both hosts must share.
    prepare_image: Callable[[], Awaitable[str]]
    disk_keys: DiskKeys
    neighbours: Neighbours

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def disk_dir(self) -> Path:
        """Where disks copied to this host live (one directory per arrival)."""
        return self.cfg.state_dir / "disks"

    def sock_dir(self, label: str) -> Path:
        """A short private directory for unix sockets (paths must stay under 108 bytes)."""
        return self.sock_root / f"{label[:2]}-{uuid.uuid4().hex[:8]}"

    async def spawn_relay(self, label: str) -> RelayRecord:
        d = self.sock_dir(label)
        return await asyncio.to_thread(
            spawn, d, self.run_dir / "relays.log", linger_s=self.cfg.migration.relay_linger_s
        )

    def safe_audit(self, kind: str, **fields: Any) -> None:
        """Audit, but never let a failing write (a full disk) change a migration's outcome."""
        try:
            self.audit(kind, **fields)
        except Exception as e:  # noqa: BLE001 - the outcome is already a fact
            log.error("audit %s not recorded: %s %s", kind, e, json.dumps(fields, default=str))
