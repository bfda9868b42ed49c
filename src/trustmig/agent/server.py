"""The host agent: one long-running asyncio process per host, and the place its parts meet.

It loads the host's identity (sealed to the measured launch), its audit trail, guard and
journal; builds the VM manager and the migration registry around narrow services; serves the
control API (TLS 1.3, mutual certificates) and the data listener of the secure channel. At start
it re-adopts every journaled guest and drives again every unfinished migration. Stopping it
(SIGTERM) leaves guests and migrations in flight running for the next agent (``[agent]
on_shutdown = "keep"``), unless the host config says ``"stop"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import random
import signal
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustmig.agent.api_admin import AdminApi
from trustmig.agent.api_migration import MigrationApi
from trustmig.agent.api_pki import PkiApi
from trustmig.agent.api_vm import VmApi
from trustmig.agent.attestation import AgentAttestation
from trustmig.agent.audit_anchor import AuditAnchor
from trustmig.agent.client import ControlClient, ControlError
from trustmig.agent.cluster_sync import ClusterSync
from trustmig.agent.control import ControlServer, Operations
from trustmig.agent.datapath import ChannelSecurity, DataListener
from trustmig.agent.diskkeys import DiskKeys
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.evacuation import Evacuation
from trustmig.agent.governance import Governance, load_or_create_ed25519, new_ed25519_pem
from trustmig.agent.host_key import load_host_key, transient_key_file
from trustmig.agent.host_report import ClusterLoads, HostReporter
from trustmig.agent.journal import Journal
from trustmig.agent.migrations import MigrationRegistry
from trustmig.agent.neighbours import Neighbours, policy_of
from trustmig.agent.observability import Observability
from trustmig.agent.runtime import AdmissionGate, HostServices
from trustmig.agent.tenancy import Tenancy
from trustmig.agent.tenant_net import TenantNetworks
from trustmig.agent.vms import VmManager
from trustmig.channel.identity import LocalIdentity
from trustmig.config import ConfigError, HostConfig, parse_hostport
from trustmig.guard import Admission, AdmissionLimits, Guard, GuardError, GuardRules
from trustmig.guard.aio import GuardedServer, guarded_serve, stop_guarded
from trustmig.guard.claims import Quarantine
from trustmig.guard.nft import apply_nft, remove_nft, render_nft
from trustmig.guard.ratelog import RateLimitedLog, Throttle
from trustmig.hypervisor.accel import choose_accel
from trustmig.hypervisor.devices import HostNet
from trustmig.hypervisor.image import GuestImage, build_image
from trustmig.hypervisor.qemu import QemuVM
from trustmig.hypervisor.spec import VMSpec
from trustmig.pki.authority import Credentials
from trustmig.pki.errors import PkiError
from trustmig.pki.identity import PeerIdentity
from trustmig.pki.tls import client_context, peer_identity, server_context
from trustmig.pki.trust import TrustBundle
from trustmig.timeouts import cancel_and_wait, within

log = logging.getLogger("trustmig.agent")
#: audit events after which the cluster store's records change: a sync round follows at once
#: pauses between attempts to reach a peer whose guard dropped the connection (about 3 s)
PEER_DIAL_BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.2)
#: how often the tenant fabric follows the quarantine
FABRIC_SYNC_S = 2.0
STORE_WAKING_EVENTS = frozenset({"vm.start", "vm.stop", "vm.resume", "migration.phase",
                                 "guard.quarantine"})  # fmt: skip
rlog = RateLimitedLog(log)


class GuardHooks:
    """The guard as the data listener and the control server use it."""

    def __init__(self, guard: Guard, audit: Any) -> None:
        self.guard = guard
        self.audit = audit
        self.refused_data: list[dict[str, Any]] = []
        self._refusal_audit = Throttle(burst=10, interval_s=60.0)

    @property
    def handshake_deadline_s(self) -> float:
        return float(self.guard.rules.handshake_deadline_s)

    def gate_connect(self, listener: str, ip: str, port: int) -> tuple[int | None, tuple[int, ...]]:
        gate = self.guard.on_connect_gated(listener, ip, port)
        if not gate.verdict.accept:
            rlog.log(logging.INFO, f"refused:{listener}:{gate.verdict.rule}",
                     "guard refused %s:%s on %s: %s", ip, port, listener,
                     gate.verdict.reason)  # fmt: skip
        return gate.conn_id, gate.evicted

    def proven(self, conn_id: int, proof: str) -> bool:
        try:
            return self.guard.on_proven(conn_id, proof).accept
        except GuardError:
            return False

    def proof_failed(self, conn_id: int, rule: str, reason: str) -> None:
        with contextlib.suppress(GuardError):
            self.guard.on_proof_failed(conn_id, rule, reason)

    def expire_unproven(self) -> list[int]:
        return self.guard.expire_unproven()

    def progress(self, conn_id: int, step: str) -> None:
        with contextlib.suppress(GuardError):
            self.guard.on_handshake_progress(conn_id, step)

    def authenticated(self, conn_id: int, identity: str) -> None:
        with contextlib.suppress(GuardError):
            v = self.guard.on_authenticated(conn_id, identity)
            if not v.accept:
                raise RequestError(v.reason, Code.REFUSED)

    def close(self, conn_id: int) -> None:
        with contextlib.suppress(GuardError):
            self.guard.on_close(conn_id)

    def refused(self, peer: tuple[str, int], reason: str) -> None:
        self.refused_data.append(
            {"peer": f"{peer[0]}:{peer[1]}", "reason": reason, "ts": time.time()}
        )
        del self.refused_data[:-100]
        # audited, but throttled: garbage thrown at the data port must not grow the audit trail
        # without bound (the guard counts every refusal)
        suppressed = self._refusal_audit.admit(f"channel.refused:{peer[0]}")
        if suppressed is not None:
            self.audit("channel.refused",
                       data={"peer": f"{peer[0]}:{peer[1]}", "reason": reason,
                             "suppressed": suppressed})  # fmt: skip


class Agent:
    def __init__(
        self, cfg: HostConfig, config_path: Path | None = None, *, accept_audit_loss: bool = False
    ) -> None:
        self.cfg = cfg
        self.accept_audit_loss = accept_audit_loss
        self.observability = Observability(self)  # first: every audit event is counted
        self.state_dir = cfg.state_dir
        self.run_dir = self.state_dir / "run"
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sock_root = short_socket_root(self.state_dir)
        self.creds = Credentials(
            cert_path=cfg.pki.cert, key_path=cfg.pki.key, ca_path=cfg.pki.ca, crl_path=cfg.pki.crl
        )
        # no CRL, no agent: revocation checking is never silently off
        self.bundle = TrustBundle.load(cfg.pki.ca, cfg.pki.crl)
        if self.creds.name() != cfg.name:
            raise RuntimeError(
                f"host certificate names {self.creds.name()!r} but the config says {cfg.name!r}: "
                f"enroll this host with 'trustmig host enroll {cfg.name}'"
            )
        self.attestation: AgentAttestation | None = None
        if cfg.attestation.enabled:
            ca_pub = x509.load_pem_x509_certificate(cfg.pki.ca.read_bytes()).public_key()
            self.attestation = AgentAttestation.start(
                cfg,
                ca_public_key=ca_pub,  # type: ignore[arg-type]
                config_path=config_path or (cfg.state_dir / "host.toml"),
            )
            # the identity key lives sealed to the measured launch, like the audit key
            self.host_key_pem = load_host_key(self.creds, self.attestation)
        else:
            self.host_key_pem = self.creds.key_path.read_bytes()
        host_key = serialization.load_pem_private_key(self.host_key_pem, None)
        assert isinstance(host_key, ec.EllipticCurvePrivateKey)
        identity = LocalIdentity(
            name=cfg.name, cert_der=self.creds.cert_der(), private_key=host_key
        )
        self.security = ChannelSecurity(
            identity=identity,
            verify_peer=self.verify_host_cert,
            make_evidence=self.attestation.make_evidence if self.attestation else None,
            verify_evidence=self.attestation.verify_evidence if self.attestation else None,
        )
        with transient_key_file(self.creds, self.host_key_pem, self.sock_root) as tmp_creds:
            self.server_ctx = server_context(tmp_creds, self.bundle)
            self.client_ctx = client_context(tmp_creds, self.bundle)
        self.journal = Journal(self.state_dir / "journal.db")
        self.gov = Governance(cfg, self.bundle, self._audit_key(), self.journal)
        guard_cfg = {"idle_timeout_s": 3600.0, "stall_timeout_s": 3600.0,
                     "reserved_peers": _peer_ips(cfg), **cfg.guard}  # fmt: skip
        self.guard = Guard(GuardRules(**guard_cfg))
        self._nft_applied = False
        self.guard_hooks = GuardHooks(self.guard, self.audit_event)
        self.admission = Admission(AdmissionLimits(**cfg.admission))
        self.quarantine = Quarantine(self.state_dir / "quarantine.json")
        self.accel = choose_accel(cfg.qemu.accel)
        tn = cfg.tenant_networks
        self.tenant_nets = TenantNetworks(cfg)
        self.host_net = HostNet(forward_address=cfg.qemu.forward_address,
                                qemu_binary=cfg.qemu.binary,
                                tenant_vnis=tuple(sorted(tn.vnis.items())),
                                tenants_only=bool(tn.vnis) and tn.tenants_only)  # fmt: skip
        if self.accel.warning:
            log.warning("%s", self.accel.warning)
        self._image: GuestImage | None = None
        self._image_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._server: GuardedServer | None = None
        self._anchor_task: asyncio.Future[None] | None = None
        self._sync_task: asyncio.Future[None] | None = None
        self._fabric_task: asyncio.Future[None] | None = None
        self.cluster_sync: ClusterSync | None = None
        self.data: DataListener | None = None
        self.control_address = ""
        self.data_advertise = ""
        if self.attestation is not None:
            self.attestation.on_verdict = self.observability.metrics.attested

    def _audit_key(self) -> Ed25519PrivateKey:
        if self.attestation is not None:
            # the audit signing key is only usable in the measured software state
            key = serialization.load_pem_private_key(
                self.attestation.unseal_or_create("audit-signing", new_ed25519_pem), None
            )
            assert isinstance(key, Ed25519PrivateKey)
            return key
        log.warning("attestation disabled in the host config: peers cannot verify this host")
        return load_or_create_ed25519(self.state_dir / "keys" / "audit.key")

    # ------------------------------------------------------------------ services
    def _placement_ops(self, ops: Operations) -> None:
        """Measured load (``host.report``, ``cluster.loads``) and ``host.evacuate``."""
        quote = self.attestation.make_evidence if self.attestation else None
        reporter = HostReporter(self.cfg, self.vms, self._host_key(), quote)
        reporter.co_residency = self._co_residency_rules
        loads = ClusterLoads(sorted(self.cfg.peers), self.connect_peer,
                             self.attestation.verify_evidence if self.attestation else None,
                             self.quarantine, self.audit_event)  # fmt: skip
        if self.cluster_sync is not None:
            loads.known = self.cluster_sync.known
            loads.on_judged = self.cluster_sync.record_reports
        reporter.register(ops)
        loads.register(ops)
        Evacuation(self.cfg, self.vms, self.gov, loads, reporter, self.registry.migrate_out,
                   self.audit_event).register(ops)  # fmt: skip

    def _co_residency_rules(self, vm: str) -> tuple[str, tuple[str, ...]]:
        policy = policy_of(self.gov.vm_policy_json(vm))
        if policy is None:
            return "any", ()
        rules = policy.co_residency
        return rules.neighbours, tuple(rules.never_with_tenants)

    def _store_status(self) -> dict[str, Any] | None:
        """What every caller of host.status may see: reachability, not other tenants' VMs
        (conflicts are in the audit trail) nor the database's address."""
        if self.cluster_sync is None:
            return None
        st = self.cluster_sync.status
        return {"reachable": st["reachable"], "last_round": st["last_round"],
                "conflicts": len(st["conflicts"]), "audit_head": st.get("audit_head"),
                "error": "unreachable" if st["reachable"] is False else None}  # fmt: skip

    def _host_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.host_key_pem, None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("the host identity key must be an ECDSA key")
        return key

    def audit_event(self, kind: str, **fields: Any) -> None:
        """Record an audit event in the host's signed, hash-chained trail."""
        log.info("audit %s %s", kind, json.dumps(fields, default=str))
        self.observability.metrics.observe_audit(kind, dict(fields))
        self.gov.event(kind, **fields)
        if self.cluster_sync is not None and kind in STORE_WAKING_EVENTS:
            self.cluster_sync.wake()

    def verify_host_cert(self, cert_der: bytes, expected_name: str) -> object:
        self.bundle.refresh()
        return self.bundle.verify_host(cert_der, expected_name)

    async def image(self) -> GuestImage:
        async with self._image_lock:
            if self._image is None:
                self._image = await asyncio.to_thread(build_image, self.cfg.image_cache)
            return self._image

    async def image_key(self) -> str:
        return (await self.image()).key

    def make_qemu(
        self,
        spec: VMSpec,
        *,
        incoming: bool,
        run_name: str,
        sock_dir: Path | None = None,
        prealloc: bool = False,
    ) -> QemuVM:
        """A QEMU for ``spec``; incoming ones always start paused (``-S``)."""
        assert self._image is not None, "the guest image is prepared before any QEMU"
        return QemuVM(
            spec,
            self._image,
            self.run_dir / run_name,
            self.accel,
            binary=self.cfg.qemu.binary,
            incoming=incoming,
            start_paused=incoming,
            prealloc=prealloc,
            host_net=self.host_net,
            sock_dir=sock_dir
            or (self.sock_root / f"{'in' if incoming else 'vm'}-{uuid.uuid4().hex[:8]}"),
        )

    async def connect_peer(self, host: str) -> ControlClient:
        peer = self.cfg.peers.get(host)
        if peer is None:
            raise RequestError(f"unknown host {host!r}: add it under [peers] in the host config",
                               Code.INVALID)  # fmt: skip
        client = await self._dial_peer(peer.control)
        sslobj = client.ssl_object
        try:
            if sslobj is None:
                raise PkiError("no TLS session")
            self.bundle.refresh()
            peer_identity(sslobj, self.bundle, kind="host", expect_name=host)
        except PkiError as e:
            await client.close()
            raise RequestError(f"peer {host} refused: {e}", Code.REFUSED) from None
        return client

    async def _dial_peer(self, address: str) -> ControlClient:
        """A peer's guard drops connections beyond its per-address budget, and a flood that
        shares this host's address spends that budget too: try again a few times, briefly.
        An agent that is not listening fails at once."""
        for delay in PEER_DIAL_BACKOFF_S:
            try:
                return await ControlClient.connect(address, self.client_ctx)
            except ControlError as e:
                if not e.reset:
                    raise
                await asyncio.sleep(delay * (0.5 + random.random()))
        return await ControlClient.connect(address, self.client_ctx)

    def _revoked(self, peer: PeerIdentity) -> bool:
        """Checked on every request, so a CRL copied in by hand also ends open sessions."""
        self.bundle.refresh()
        return self.bundle.is_revoked(peer.serial)

    def _authenticate(self, sslobj: Any) -> PeerIdentity:
        self.bundle.refresh()
        return peer_identity(sslobj, self.bundle)

    def _services(self) -> HostServices:
        return HostServices(
            cfg=self.cfg,
            journal=self.journal,
            audit=self.audit_event,
            vms=self.vms,
            admission=AdmissionGate(
                self.admission,
                self.audit_event,
                float(self.cfg.admission.get("queue_timeout_s", 300)),
            ),
            security=self.security,
            quarantine=self.quarantine,
            gov=self.gov,
            creds=self.creds,
            host_key_pem=self.host_key_pem,
            connect_peer=self.connect_peer,
            make_qemu=self.make_qemu,
            sock_root=self.sock_root,
            run_dir=self.run_dir,
            data_advertise=lambda: self.data_advertise,
            attesting=self.attestation is not None,
            prepare_image=self.image_key,
            disk_keys=self.disk_keys,
            neighbours=self.neighbours,
        )

    def _status_extra(self) -> dict[str, Any]:
        return {
            "accel": self.accel.accel,
            "accel_warning": self.accel.warning,
            "control": self.control_address,
            "data_advertise": self.data_advertise,
            "metrics": self.observability.address,
            "labels": self.cfg.labels,
            "peers": {name: p.control for name, p in sorted(self.cfg.peers.items())},
            "refused_data_connections": self.guard_hooks.refused_data[-10:],
            "store": self._store_status(),
        }

    # ------------------------------------------------------------------ lifecycle
    async def run(self, ready_file: Path | None = None) -> None:
        loop = asyncio.get_running_loop()
        await self.image()
        self.disk_keys = DiskKeys(self.attestation, self.audit_event, self.cfg.name)
        self.vms = VmManager(self.journal, self.audit_event, self.cfg.name, self.make_qemu,
                             self.image_key, self.host_net, self.disk_keys)  # fmt: skip
        self.neighbours = Neighbours(self.cfg.name, self.vms, self.gov.vm_policy_json,
                                     self.audit_event)  # fmt: skip
        self.services = self._services()
        self.registry = MigrationRegistry(self.services)
        ops = Operations()
        self.anchor = AuditAnchor(self.cfg.name, self.gov.audit, self.journal,
                                  sorted(self.cfg.peers), self.connect_peer,
                                  self.audit_event)  # fmt: skip
        tenancy = Tenancy(self.vms, self.audit_event)
        VmApi(self.cfg.name, self.vms, self.gov, tenancy, self.neighbours).register(ops)
        migration_api = MigrationApi(self.cfg.name, self.registry, self.gov, tenancy)
        migration_api.on_receipt = self.observability.measure_pause
        migration_api.register(ops)
        admin = AdminApi(
            self.cfg.name, self.gov, self.vms, self.registry, self.guard, self.admission,
            self.quarantine, self._status_extra,
            self.attestation.status if self.attestation else None, tenancy, self.anchor,
        )  # fmt: skip
        admin.on_audit_verified = self.observability.note_audit_verified
        admin.register(ops)
        if self.cfg.store.url:
            self.cluster_sync = ClusterSync(self.cfg.name, self.cfg.store.url, self.vms,
                                            self.quarantine, self.audit_event,
                                            self.gov.audit.durable_head,
                                            self.cfg.store.interval_s)  # fmt: skip
            admin.clear_cluster = self.cluster_sync.clear
        control = ControlServer(ops, self._authenticate, self.audit_event,
                                self.guard_hooks.authenticated,
                                is_peer=lambda name: name in self.cfg.peers,
                                is_revoked=self._revoked)  # fmt: skip
        PkiApi(self.cfg.name, self.bundle, control, self.audit_event, sorted(self.cfg.peers),
               self.connect_peer).register(ops)  # fmt: skip
        self.anchor.register(ops)
        self._placement_ops(ops)
        control.starting_ops = frozenset({"ping", "crl.show", "audit.witness", "audit.witnessed"})

        async def serve(reader: Any, writer: Any, conn_id: int) -> None:
            try:
                await control.serve(reader, writer, conn_id)
            finally:
                self.guard_hooks.close(conn_id)

        host, port = parse_hostport(self.cfg.control.listen)
        with _listener("control", self.cfg.control.listen):
            self._server = await guarded_serve(
                self.guard, "control", host, port, serve, ssl_ctx=self.server_ctx,
                handshake_timeout=self.guard.rules.handshake_deadline_s,
            )  # fmt: skip
        sock = self._server.sockets[0].getsockname()
        self.control_address = f"{sock[0]}:{sock[1]}"
        dhost, dport = parse_hostport(self.cfg.data.listen)
        with _listener("data", self.cfg.data.listen):
            self.data = DataListener(self.security, self.guard_hooks, self.registry, dhost, dport)
        self.registry.forget_session = self.data.forget
        self.data.start()
        self.data_advertise = (
            self.cfg.data.advertise or f"{self.data.address[0]}:{self.data.address[1]}"
        )
        self._apply_kernel_rules(int(sock[1]), int(self.data.address[1]))
        self.tenant_nets.apply()  # before any guest: segments and the rules between them
        self.tenant_nets.sync(set(self.quarantine.snapshot()))
        if self.tenant_nets.enabled:
            self._fabric_task = asyncio.ensure_future(self._keep_fabric())
        with _listener("metrics", self.cfg.metrics.listen):
            await self.observability.start()
        # the audit trail must be the one the peers saw before anything else happens
        try:
            await self.anchor.check_at_start(self.accept_audit_loss)
        except BaseException:
            await stop_guarded(self._server)
            self.data.close()
            raise
        control.starting_ops = None
        self._anchor_task = asyncio.ensure_future(
            self.anchor.run(self.cfg.agent.audit_witness_interval_s)
        )
        if self.cluster_sync is not None:
            self._sync_task = asyncio.ensure_future(self.cluster_sync.run())
        # what survived the previous agent: its guests, then its migrations
        await self.vms.load()
        restored = await self.registry.restore_all()
        self.vms.start_watching()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        info = {
            "host": self.cfg.name,
            "pid": os.getpid(),
            "control": self.control_address,
            "data": f"{self.data.address[0]}:{self.data.address[1]}",
            "data_advertise": self.data_advertise,
            "metrics": self.observability.address,
            "accel": self.accel.accel,
            "accel_warning": self.accel.warning,
            "adopted_vms": sorted(self.vms.vms),
            "restored_migrations": restored,
        }
        self.audit_event("agent.start", data=info)
        if ready_file:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            tmp.replace(ready_file)
        log.info("agent %s ready: control %s, data %s", self.cfg.name, self.control_address,
                 info["data"])  # fmt: skip
        await self._stop.wait()
        await self.shutdown()

    async def _keep_fabric(self) -> None:
        """Quarantined peers leave the tenant fabric, and rejoin once cleared."""
        while True:
            await asyncio.sleep(FABRIC_SYNC_S)
            try:
                await asyncio.to_thread(self.tenant_nets.sync, set(self.quarantine.snapshot()))
            except Exception:  # noqa: BLE001 - logged; the next round tries again
                log.exception("tenant fabric sync failed")

    def _apply_kernel_rules(self, control_port: int, data_port: int) -> None:
        """The guard's rules in the kernel too (``[guard] apply_nftables``): its own table in
        this host's network namespace, replaced at every start and removed at the stop."""
        rules = self.guard.rules
        if not rules.apply_nftables:
            return
        apply_nft(render_nft(rules, control_port=control_port, data_port=data_port))
        self._nft_applied = True
        log.info("guard rules applied to the kernel (nft table inet trustmig)")

    async def shutdown(self) -> None:
        log.info("agent %s stopping (%s guests)", self.cfg.name, self.cfg.agent.on_shutdown)
        t0 = time.monotonic()
        if self._sync_task is not None:
            await cancel_and_wait(self._sync_task)
        if self._fabric_task is not None:
            await cancel_and_wait(self._fabric_task)
        if self._anchor_task is not None:
            await cancel_and_wait(self._anchor_task)
            with contextlib.suppress(Exception):
                await within(self.anchor.push(), 5.0)  # the final head, for the next start
        if self._server:
            await stop_guarded(self._server)
        if self.data:
            self.data.close()
        await self.observability.stop()
        await self.registry.detach()
        t1 = time.monotonic()
        if self.cfg.agent.on_shutdown == "stop":
            await self.vms.stop_all()
        else:
            await self.vms.detach_all()
        t2 = time.monotonic()
        if self._nft_applied:
            remove_nft()
        self.audit_event("agent.stop", data={"guests": self.cfg.agent.on_shutdown})
        if self.cluster_sync is not None:
            self.cluster_sync.close()
        self.gov.close()
        self.journal.close()
        if self.attestation:
            self.attestation.close()
        log.info("agent %s stopped: migrations %.2fs, guests %.2fs, rest %.2fs", self.cfg.name,
                 t1 - t0, t2 - t1, time.monotonic() - t2)  # fmt: skip

    def request_stop(self) -> None:
        self._stop.set()


def dump_tasks() -> None:
    """SIGUSR1: write every asyncio task and where it waits to the log (for operators)."""
    for task in asyncio.all_tasks():
        frames = " <- ".join(
            f"{Path(f.f_code.co_filename).name}:{f.f_lineno} {f.f_code.co_name}"
            for f in task.get_stack(limit=8)
        )
        log.warning("task %s: %s", task.get_name(), frames or repr(task))


def _peer_ips(cfg: HostConfig) -> list[str]:
    """IP addresses of the configured peers (literal control addresses; names are skipped)."""
    ips: list[str] = []
    for peer in cfg.peers.values():
        host = parse_hostport(peer.control)[0]
        with contextlib.suppress(ValueError):
            ips.append(str(ipaddress.ip_address(host)))
    return sorted(set(ips))


def short_socket_root(state_dir: Path) -> Path:
    """A short private directory for unix sockets (paths must stay under 108 bytes)."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    tag = hashlib.sha256(str(state_dir).encode()).hexdigest()[:10]
    root = base / f"trustmig-{tag}"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _listener(name: str, address: str) -> Iterator[None]:
    """A bind failure names the listener and the setting to change."""
    try:
        yield
    except OSError as e:
        raise ConfigError(
            f"{name} listener {address}: {e.strerror or e}; change [{name}] listen in the host "
            "config or stop what uses the port"
        ) from None


def make_private(state_dir: Path) -> None:
    """Take group and other access away from a state dir an older release left open."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for root, dirs, files in os.walk(state_dir):
        for name in (*dirs, *files):
            p = Path(root) / name
            with contextlib.suppress(OSError):
                st = p.lstat()
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                    os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o077)
    os.chmod(state_dir, 0o700)


def run_agent(
    cfg: HostConfig,
    ready_file: Path | None = None,
    config_path: Path | None = None,
    *,
    accept_audit_loss: bool = False,
) -> None:
    # everything the agent and its QEMUs create (audit trail, journal, policies, console logs,
    # sockets) is readable by root only
    os.umask(0o077)
    make_private(cfg.state_dir)

    async def _main() -> None:
        agent = Agent(cfg, config_path, accept_audit_loss=accept_audit_loss)
        await agent.run(ready_file)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
