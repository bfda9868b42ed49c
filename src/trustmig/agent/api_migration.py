"""Control API: migrations, as users see them (migrate, list, show, resolve) and as peers do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trustmig.agent.control import Operations, Request
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.governance import Governance
from trustmig.agent.migrations import MigrationRegistry
from trustmig.agent.tenancy import Tenancy, ownership_of_row
from trustmig.hypervisor.migration import MigrationOptions
from trustmig.policy import VmAction

RESOLVE_CHOICES = ("destination", "source", "retry")


class MigrationApi:
    def __init__(
        self, host: str, registry: MigrationRegistry, gov: Governance, tenancy: Tenancy
    ) -> None:
        self.host = host
        self.registry = registry
        self.gov = gov
        self.tenancy = tenancy
        #: measures the guest's felt pause from the source's last heartbeats (the metrics)
        self.on_receipt: Callable[[str, list[Any], str, str], None] | None = None

    def register(self, ops: Operations) -> None:
        ops.add("migrate", self.migrate)
        ops.add("migration.list", self.list)
        ops.add("migration.show", self.show)
        ops.add("migration.resolve", self.resolve)
        host = ("host",)
        ops.add("incoming.prepare", self.prepare, kinds=host)
        ops.add("incoming.commit", self.commit, kinds=host)
        ops.add("incoming.abort", self.abort, kinds=host)
        ops.add("incoming.status", self.status, kinds=host)
        ops.add("incoming.receipt", self.receipt, kinds=host)
        ops.add("incoming.recover", self.recover, kinds=host)
        ops.add("incoming.disk_keys", self.disk_keys, kinds=host)

    # ------------------------------------------------------------------ users
    async def migrate(self, req: Request) -> dict[str, Any]:
        opts = MigrationOptions.model_validate(req.params.get("options") or {})
        name = req.param("vm")
        self.tenancy.vm(req.peer, req.op, VmAction.MIGRATE, name)
        return await self.registry.migrate_out(name, req.param("to"), opts, req.peer, req.emit)

    def _seen(self, req: Request, mid: str, action: VmAction) -> dict[str, Any]:
        row = self.registry.describe(mid)
        self.tenancy.check(req.peer, req.op, action, ownership_of_row(row))
        return row

    async def list(self, req: Request) -> dict[str, Any]:
        limit = int(req.params.get("limit") or 100)
        rows = self.tenancy.visible_rows(req.peer, self.registry.describe_all(limit))
        return {"host": self.host, "migrations": rows}

    async def show(self, req: Request) -> dict[str, Any]:
        return {"host": self.host, **self._seen(req, req.param("migration_id"), VmAction.VIEW)}

    async def resolve(self, req: Request) -> dict[str, Any]:
        keep = req.param("keep")
        if keep not in RESOLVE_CHOICES:
            raise RequestError(
                f"keep must be one of {', '.join(RESOLVE_CHOICES)}, not {keep!r}", Code.INVALID
            )
        mid = req.param("migration_id")
        self._seen(req, mid, VmAction.RESOLVE)
        res = await self.registry.resolve(mid, keep, req.peer.name)
        return {"host": self.host, "migration_id": mid, "keep": keep, **res}

    # ------------------------------------------------------------------ peers
    async def prepare(self, req: Request) -> dict[str, Any]:
        return await self.registry.prepare_in(
            req.params, req.peer.name, req.conn.peer_cert_der(), req.conn.closed
        )

    async def commit(self, req: Request) -> dict[str, Any]:
        measurement = req.params.get("measurement")
        if measurement is not None and not (
            isinstance(measurement, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in measurement.items())
        ):
            raise RequestError("incoming.commit: measurement must map region names to digests",
                               Code.INVALID)  # fmt: skip
        return await self.registry.commit_in(req.param("migration_id"), req.peer.name,
                                             req.conn.closed, measurement)  # fmt: skip

    async def abort(self, req: Request) -> dict[str, Any]:
        reason = str(req.params.get("reason") or "source aborted")
        return await self.registry.abort_in(
            req.param("migration_id"), req.peer.name, reason, req.conn.closed
        )

    async def status(self, req: Request) -> dict[str, Any]:
        return self.registry.status_in(req.param("migration_id"), req.peer.name, req.conn.closed)

    async def recover(self, req: Request) -> dict[str, Any]:
        return await self.registry.recover_in(
            req.param("migration_id"), req.peer.name, req.conn.closed
        )

    async def disk_keys(self, req: Request) -> dict[str, Any]:
        wrapped = req.param("keys", dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in wrapped.items()):
            raise RequestError("incoming.disk_keys: keys must map disk ids to wrapped keys",
                               Code.INVALID)  # fmt: skip
        return await self.registry.disk_keys_in(
            req.param("migration_id"), req.peer.name, req.conn.closed, wrapped
        )

    async def receipt(self, req: Request) -> dict[str, Any]:
        mid = req.param("migration_id")
        vm, peer_pub = self.registry.incoming_for_receipt(mid, req.peer.name)
        fields = dict(req.param("fields", dict))
        if fields.get("migration_id") != mid or fields.get("destination") != self.host:
            raise RequestError("receipt does not describe this migration", Code.INVALID)
        own = self.gov.sign_receipt(fields)
        self.gov.check_and_store_receipt(fields, own, req.peer.name, req.param("signature"),
                                         peer_pub)  # fmt: skip
        felt = req.params.get("felt")
        if isinstance(felt, dict) and self.on_receipt is not None:
            self.on_receipt(vm, felt.get("heartbeats") or [], str(felt.get("channel")),
                            str(felt.get("mode")))  # fmt: skip
        return {"signature": own}
