"""Policy decisions, audit trail and receipts as the agent uses them.

Keeps server.py about transport and lifecycle: this module answers "may this user move this VM
there?" on both ends (the VM's signed policy travels with it; the destination also applies its
own host policy) and records every decision, phase and receipt in the host's signed, hash-chained
audit trail.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from trustmig.audit import AuditLog, sign_receipt, verify_receipt
from trustmig.config import HostConfig
from trustmig.pki.trust import TrustBundle
from trustmig.policy import (
    Decision,
    HostLabels,
    HostPolicy,
    MigrationHistory,
    MigrationRequest,
    PolicyError,
    PolicyStaleError,
    SignedPolicy,
    VmOwnership,
    VmPolicy,
    decide_migrate_in,
    decide_migrate_out,
    load_host_policy,
    verify_signed_policy,
)

log = logging.getLogger(__name__)
FLUSH_KINDS = ("migration.", "policy.", "agent.", "receipt", "attest.", "migrate.", "vm.",
               "access.", "pki.", "audit.", "disk.")  # fmt: skip


def load_or_create_ed25519(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 key: remove it to create a new audit key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def new_ed25519_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_pem(pem: str) -> Ed25519PublicKey:
    k = serialization.load_pem_public_key(pem.encode())
    if not isinstance(k, Ed25519PublicKey):
        raise ValueError("peer audit key is not Ed25519")
    return k


def audit_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'audit.db'}"


class PolicySerials(Protocol):
    """Where the highest accepted policy serial per VM is kept (the host journal)."""

    def policy_serial(self, vm: str) -> int: ...

    def raise_policy_serial(self, vm: str, serial: int) -> None: ...


class Governance:
    def __init__(
        self,
        cfg: HostConfig,
        bundle: TrustBundle,
        audit_key: Ed25519PrivateKey,
        serials: PolicySerials,
    ) -> None:
        self.cfg = cfg
        self.serials = serials
        self.bundle = bundle
        self.audit_key = audit_key
        keys = cfg.state_dir / "keys"
        keys.mkdir(parents=True, exist_ok=True, mode=0o700)
        (keys / "audit.pub").write_text(public_pem(audit_key.public_key()))
        self.audit = AuditLog(audit_url(cfg.state_dir), host=cfg.name, signing_key=audit_key)
        self.history = MigrationHistory(cfg.state_dir / "migration-history.json")
        self.vm_policy_dir = cfg.state_dir / "vm-policies"
        self.vm_policy_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.host_policy: HostPolicy | None = None
        hp = cfg.host_policy or (cfg.policy_dir / "host.toml")
        if hp.exists():
            self.host_policy = load_host_policy(hp)
            if self.host_policy.host != cfg.name:
                raise PolicyError(
                    f"{hp}: host policy is for {self.host_policy.host!r}, "
                    f"not this host {cfg.name!r}"
                )

    @property
    def audit_public_pem(self) -> str:
        return public_pem(self.audit_key.public_key())

    # ------------------------------------------------------------------ audit
    def event(self, kind: str, **fields: Any) -> None:
        data = fields.pop("data", None)
        self.audit.append(
            kind,
            vm=fields.get("vm"),
            migration_id=fields.get("migration_id"),
            user=fields.get("user"),
            outcome=fields.get("outcome"),
            data=data,
        )
        if kind.startswith(FLUSH_KINDS):
            self.audit.flush()

    # ------------------------------------------------------------------ VM policies
    def _verify_signer(self, cert_der: bytes) -> Any:
        self.bundle.refresh()
        return self.bundle.verify(cert_der, kind="user")

    def verify_policy(
        self, signed_json: str, ownership: VmOwnership
    ) -> tuple[SignedPolicy, VmPolicy]:
        """Verify a signed policy against the VM's recorded tenant and owner."""
        sp = SignedPolicy.from_json(signed_json)
        return sp, verify_signed_policy(sp, self._verify_signer, ownership)

    def set_vm_policy(
        self, signed_json: str, ownership: VmOwnership, *, same_serial_ok: bool = False
    ) -> VmPolicy:
        """Install a policy for a VM: verified, and newer than every one this host accepted.

        ``same_serial_ok`` is for a VM arriving with the very policy this host once held.
        Raises ``PolicyError`` (a ``PolicySignatureError`` for who signed it).
        """
        sp, pol = self.verify_policy(signed_json, ownership)
        return self.install_verified_policy(sp, pol, ownership, same_serial_ok=same_serial_ok)

    def install_verified_policy(
        self, sp: SignedPolicy, pol: VmPolicy, ownership: VmOwnership, *,
        same_serial_ok: bool = False,
    ) -> VmPolicy:  # fmt: skip
        """Install a policy :meth:`verify_policy` accepted: newer than every one this host
        accepted, or the same serial with ``same_serial_ok``. Raises ``PolicyStaleError``.

        An arriving VM's policy is verified while its memory is still on the way, so that
        taking ownership at the commit only writes it.
        """
        vm = ownership.vm
        held = self.serials.policy_serial(vm)
        if pol.serial < held or (pol.serial == held and not same_serial_ok):
            raise PolicyStaleError(
                f"policy for {vm}: serial {pol.serial} is not newer than serial {held} held on "
                f"{self.cfg.name}; sign it again with serial = {held + 1} or higher"
            )
        path = self.vm_policy_dir / f"{vm}.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(sp.to_json())
        tmp.replace(path)
        self.serials.raise_policy_serial(vm, pol.serial)
        return pol

    def vm_policy_json(self, vm: str) -> str | None:
        p = self.vm_policy_dir / f"{vm}.json"
        return p.read_text() if p.exists() else None

    def drop_vm_policy(self, vm: str) -> None:
        (self.vm_policy_dir / f"{vm}.json").unlink(missing_ok=True)

    # ------------------------------------------------------------------ decisions
    def peer_labels(self, host: str) -> HostLabels:
        peer = self.cfg.peers.get(host)
        raw = dict(peer.labels) if peer else {}
        try:
            return HostLabels.model_validate(
                {
                    "country": raw.get("country", "ZZ"),
                    "zone": raw.get("zone"),
                    "security_level": int(raw.get("security_level", 0)),
                }
            )
        except ValueError as e:
            raise PolicyError(f"labels of peer {host} in the host config: {e}") from None

    def decide_out(self, user: Any, ownership: VmOwnership, dest: str, postcopy: bool) -> Decision:
        vm = ownership.vm
        sj = self.vm_policy_json(vm)
        policy = None
        if sj is not None:
            try:
                _, policy = self.verify_policy(sj, ownership)
            except PolicyError as e:
                return Decision(False, "policy.signature", str(e), direction="migrate-out",
                                vm=vm, source=self.cfg.name, destination=dest,
                                user=user.name)  # fmt: skip
        req = MigrationRequest(
            user=user,
            vm=vm,
            source=self.cfg.name,
            destination=dest,
            destination_labels=self.peer_labels(dest),
            postcopy=postcopy,
            now=datetime.now(UTC),
        )
        return decide_migrate_out(req, policy, self.history)

    def decide_in(
        self,
        user: dict[str, Any],
        signed_json: str | None,
        ownership: VmOwnership,
        source: str,
        postcopy: bool,
    ) -> Decision:
        """The destination's decision; the travelling policy must verify against the VM's
        ownership as the source sent it and be at least as new as any this host accepted."""
        vm = ownership.vm
        principal = SimpleNamespace(
            name=str(user.get("name") or "?"),
            roles=tuple(user.get("roles") or ()),
            tenant=user.get("tenant"),
        )

        def deny(rule: str, reason: str) -> Decision:
            return Decision(False, rule, reason, direction="migrate-in", vm=vm, source=source,
                            destination=self.cfg.name, user=principal.name)  # fmt: skip

        policy = None
        if signed_json:
            try:
                _, policy = self.verify_policy(signed_json, ownership)
            except PolicyError as e:
                return deny("policy.signature", str(e))
            held = self.serials.policy_serial(vm)
            if policy.serial < held:
                return deny(
                    "policy.serial",
                    f"the source acts on policy serial {policy.serial} of {vm} but "
                    f"{self.cfg.name} holds serial {held}; set the newer policy on the source",
                )
        if self.host_policy is None:
            return deny("default-deny", f"no host policy on {self.cfg.name}")
        labels = self.host_policy.labels
        req = MigrationRequest(
            user=principal,
            vm=vm,
            source=source,
            destination=self.cfg.name,
            destination_labels=labels,
            postcopy=postcopy,
            now=datetime.now(UTC),
        )
        return decide_migrate_in(req, policy, self.host_policy, self.history)

    def record_migration(self, vm: str) -> None:
        self.history.record(vm, datetime.now(UTC))

    # ------------------------------------------------------------------ receipts
    def sign_receipt(self, fields: dict[str, Any]) -> str:
        return base64.b64encode(sign_receipt(self.audit_key, fields)).decode()

    def check_and_store_receipt(
        self,
        fields: dict[str, Any],
        own_sig_b64: str,
        peer: str,
        peer_sig_b64: str,
        peer_pub_pem: str,
    ) -> None:
        peer_sig = base64.b64decode(peer_sig_b64)
        if not verify_receipt(load_public_pem(peer_pub_pem), fields, peer_sig):
            raise PolicyError(f"receipt signature of {peer} does not verify")
        self.audit.store_receipt(fields, base64.b64decode(own_sig_b64), peer, peer_sig)
        self.audit.flush()  # the receipt is appended as an audit event by store_receipt

    def close(self) -> None:
        self.audit.flush()
        self.audit.close()


def stream_digest(pumps: list[Any]) -> str:
    """Commit to every stream's authenticated record chain (the channel's running tag digest)."""
    h = hashlib.sha256()
    for p in sorted(pumps, key=lambda p: p.index):
        h.update(p.index.to_bytes(2, "big"))
        h.update(p.sealer.digest)
        h.update(p.stats.bytes_out.to_bytes(8, "big"))
    return h.hexdigest()
