"""The keys of a host's encrypted disks: made here, sealed by the TPM, released to a peer only
inside an attested session, forgotten once the VM has left.

Each encrypted disk has one 32-byte key, sealed like the host keys (``keys/disk-*.sealed``, with
the CA recovery copy ``trustmig host reseal`` uses after an upgrade). It exists on exactly the
host that owns the VM: the source releases it to the destination wrapped under a key exported
from their attested session (so only the peer that proved its platform in that handshake can
unwrap it), the destination seals it before it opens the disk, and the source deletes its copy
once it handed the VM over. A migration that fails deletes the copy it received. Every creation,
use, release, receipt and deletion of a key is audited.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trustmig.agent.errors import Code, RequestError
from trustmig.hypervisor.diskcrypt import (
    KEY_SIZE,
    DiskCryptError,
    create_encrypted,
    encrypted_size,
    new_disk_key,
)
from trustmig.hypervisor.spec import DiskSpec, VMSpec

#: label of the session exporter that wraps disk keys on their way to the destination
EXPORTER_LABEL = "disk keys"


class SecretStore(Protocol):
    """Sealed secrets by name (the agent's TPM-backed store)."""

    def seal_new(self, name: str, secret: bytes) -> None: ...
    def unseal(self, name: str) -> bytes | None: ...
    def forget(self, name: str) -> bool: ...


class Audit(Protocol):
    def __call__(self, kind: str, **fields: Any) -> None: ...


def encrypted_disks(spec: VMSpec) -> list[DiskSpec]:
    return [d for d in spec.disks if d.encrypt]


def key_name(vm: str, disk_id: str) -> str:
    """The sealed secret's name of a VM's disk (within the store's 63-character names)."""
    return "disk-" + hashlib.sha256(f"{vm}/{disk_id}".encode()).hexdigest()[:40]


def _aad(migration_id: str, vm: str, disk_id: str) -> bytes:
    return f"trustmig disk key\0{migration_id}\0{vm}\0{disk_id}".encode()


class DiskKeys:
    """Disk keys of one host; ``store`` is None on a host without a TPM (attestation off),
    which then runs no encrypted disk."""

    def __init__(self, store: SecretStore | None, audit: Audit, host: str) -> None:
        self.store = store
        self.audit = audit
        self.host = host

    def require_keeper(self, spec: VMSpec) -> None:
        """Refuse (RequestError) a VM with encrypted disks on a host that cannot keep keys."""
        if encrypted_disks(spec):
            self._require_store(spec.name)

    def _require_store(self, vm: str) -> SecretStore:
        if self.store is None:
            raise RequestError(
                f"VM {vm} has encrypted disks, whose keys only a host TPM keeps: enable "
                f"[attestation] on {self.host}",
                Code.REFUSED,
            )
        return self.store

    # ------------------------------------------------------------------ starting here
    async def for_start(self, spec: VMSpec, user: str | None) -> tuple[VMSpec, dict[str, bytes]]:
        """The keys QEMU needs to start ``spec`` (each encrypted disk created first if it does
        not exist yet) and the definition with their virtual sizes; raises RequestError."""
        disks = encrypted_disks(spec)
        if not disks:
            return spec, {}
        store = self._require_store(spec.name)
        keys: dict[str, bytes] = {}
        sized = {}
        for d in disks:
            keys[d.id] = await asyncio.to_thread(self._key_for_start, store, spec.name, d, user)
            try:
                sized[d.id] = await asyncio.to_thread(encrypted_size, d, keys[d.id])
            except DiskCryptError as e:
                raise RequestError(f"VM {spec.name}: {e}", Code.REFUSED) from None
            self.audit("disk.key", vm=spec.name, user=user, outcome="used",
                       data={"disk": d.id, "for": "start"})  # fmt: skip
        new = [d.model_copy(update={"virtual_size": sized[d.id]}) if d.id in sized else d
               for d in spec.disks]  # fmt: skip
        return spec.model_copy(update={"disks": new}), keys

    def _key_for_start(self, store: SecretStore, vm: str, d: DiskSpec, user: str | None) -> bytes:
        key = store.unseal(key_name(vm, d.id))
        if d.path.exists():
            if key is None:
                raise RequestError(
                    f"VM {vm}: disk {d.id} ({d.path}) exists but {self.host} holds no key for "
                    "it; trustmig opens only encrypted disks it created or received with the VM",
                    Code.REFUSED,
                )
            return key
        if key is not None:
            raise RequestError(
                f"VM {vm}: encrypted disk {d.id} is missing ({d.path}); restore the image (its "
                "key is still sealed here)",
                Code.REFUSED,
            )
        if d.size_mib is None:
            raise RequestError(
                f"VM {vm}: disk {d.id} ({d.path}) does not exist; give it size_mib so trustmig "
                "creates it encrypted",
                Code.INVALID,
            )
        key = new_disk_key()
        store.seal_new(key_name(vm, d.id), key)  # sealed before any byte is encrypted with it
        try:
            create_encrypted(d, d.size_mib << 20, key)
        except DiskCryptError as e:
            store.forget(key_name(vm, d.id))
            raise RequestError(f"VM {vm}: {e}", Code.FAILED) from None
        self.audit("disk.key", vm=vm, user=user, outcome="created",
                   data={"disk": d.id, "path": str(d.path), "size_mib": d.size_mib})  # fmt: skip
        return key

    # ------------------------------------------------------------------ migrating out
    async def release(
        self, spec: VMSpec, to_host: str, migration_id: str, wrap_key: bytes, evidence: str
    ) -> dict[str, str]:
        """Each encrypted disk's key wrapped for the destination (AES-256-GCM under the key
        exported from the attested session, bound to migration, VM and disk)."""
        disks = encrypted_disks(spec)
        if not disks:
            return {}
        store = self._require_store(spec.name)
        wrapped: dict[str, str] = {}
        aead = AESGCM(wrap_key)
        for d in disks:
            key = await asyncio.to_thread(store.unseal, key_name(spec.name, d.id))
            if key is None:
                raise RequestError(f"VM {spec.name}: no key for disk {d.id} is sealed here",
                                   Code.FAILED)  # fmt: skip
            nonce = os.urandom(12)
            sealed = aead.encrypt(nonce, key, _aad(migration_id, spec.name, d.id))
            wrapped[d.id] = base64.b64encode(nonce + sealed).decode()
        self.audit("disk.key", vm=spec.name, migration_id=migration_id, outcome="released",
                   data={"disks": sorted(wrapped), "to": to_host,
                         "attestation": evidence})  # fmt: skip
        return wrapped

    async def forget(self, spec: VMSpec, migration_id: str | None, reason: str) -> None:
        """Delete this host's copies of the VM's disk keys (the VM left, or never arrived)."""
        disks = encrypted_disks(spec)
        if not disks or self.store is None:
            return
        store = self.store
        gone = [d.id for d in disks
                if await asyncio.to_thread(store.forget, key_name(spec.name, d.id))]  # fmt: skip
        if gone:
            self.audit("disk.key", vm=spec.name, migration_id=migration_id, outcome="forgotten",
                       data={"disks": gone, "reason": reason})  # fmt: skip

    # ------------------------------------------------------------------ migrating in
    async def receive(
        self, spec: VMSpec, source: str, migration_id: str, wrap_key: bytes,
        wrapped: dict[str, Any],
    ) -> dict[str, bytes]:  # fmt: skip
        """Unwrap and seal the keys the source released; raises RequestError (invalid) for a
        key that is missing, extra or not sealed for this session."""
        store = self._require_store(spec.name)
        want = {d.id for d in encrypted_disks(spec)}
        if set(wrapped) != want:
            raise RequestError(f"disk keys for {sorted(wrapped)} arrived, the VM's encrypted "
                               f"disks are {sorted(want)}", Code.INVALID)  # fmt: skip
        aead = AESGCM(wrap_key)
        keys: dict[str, bytes] = {}
        for disk_id in sorted(want):
            try:
                raw = base64.b64decode(str(wrapped[disk_id]), validate=True)
                key = aead.decrypt(raw[:12], raw[12:], _aad(migration_id, spec.name, disk_id))
            except (ValueError, InvalidTag):
                raise RequestError(f"the key of disk {disk_id} was not wrapped for this "
                                   "attested session", Code.INVALID) from None  # fmt: skip
            if len(key) != KEY_SIZE:
                raise RequestError(f"the key of disk {disk_id} has the wrong size", Code.INVALID)
            keys[disk_id] = key
        for disk_id, key in keys.items():
            await asyncio.to_thread(store.seal_new, key_name(spec.name, disk_id), key)
        self.audit("disk.key", vm=spec.name, migration_id=migration_id, outcome="received",
                   data={"disks": sorted(keys), "from": source})  # fmt: skip
        return keys
