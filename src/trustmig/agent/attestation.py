"""Attestation inside the host agent: measured launch at start, evidence in the channel handshake,
keys sealed to the launch, and resealing after an authorized upgrade.

The agent owns its host's TPM for its whole life. At start it measures the software it runs
(QEMU, the trustmig package, its config, the policy bundle; see `provisioning.host_launch_items`)
into PCRs 11-13, so every quote it later produces in a channel handshake shows exactly that
software. Peers judge the quote against the shared AK registry and the CA-signed reference
values; both are re-read when their files change, because hosts enroll and admins approve
upgrades while agents run.

Sealed keys. ``unseal_or_create`` keeps a secret (the host identity key, the audit signing key)
usable only while PCRs 11+12 (software + agent config) hold their launch values. PCR 13 (policy
bundle) is left out on purpose: policies change often and must not lock the host out of its own
keys. A TPM can seal at most 128 bytes, so the TPM seals a random 32-byte key-encryption key and
the secret itself (a PEM key is ~240 bytes) is AES-256-GCM encrypted under it:
``state_dir/keys/<name>.sealed``.

Recovery and reseal. After an upgrade the old PCR values are gone, so nothing on the host can
unseal the old blob any more (that is the point of sealing). The secret is therefore also kept
encrypted to the cluster CA's public key (ECIES: ephemeral ECDH P-256 + HKDF-SHA256 +
AES-256-GCM): ``state_dir/keys/<name>.recovery``. ``trustmig host reseal --ca-dir`` (agent
stopped) checks that every new measurement is in the signed reference values -- that is what
makes the upgrade *authorized* -- decrypts the recovery files with the CA key and seals each
secret to the PCR values the new launch will produce. The trade-off, stated honestly: whoever
holds the CA key can recover a host's keys. That party can already issue any host certificate,
so this adds no new power over host identity; keep the CA key offline.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from tpm2_pytss import TPM2_SU

from trustmig.agent.provisioning import file_lock, host_launch_items, load_refvalues
from trustmig.attest.enroll import AkRegistry, enroll_host
from trustmig.attest.errors import AttestationFailed, AttestError
from trustmig.attest.evidence import make_evidence, verify_evidence
from trustmig.attest.measure import DATA_EVENTS, LAUNCH_PCRS, EventLog, measured_launch
from trustmig.attest.refvalues import RefValues, key_id
from trustmig.attest.sealing import predict_pcrs
from trustmig.attest.swtpm import TPM_DEVICE, open_tpm
from trustmig.attest.tpm import HostTpm, TpmKeys
from trustmig.config import HostConfig

log = logging.getLogger("trustmig.agent.attestation")

#: PCRs sealed keys are bound to: software (11) and agent config (12), not the policy bundle.
SEAL_PCRS: tuple[int, ...] = (11, 12)
#: Peers whose last attestation outcome is kept (oldest dropped first).
MAX_RESULTS = 64
SEALED_KEY_FORMAT = "trustmig-sealed-key/1"
RECOVERY_FORMAT = "trustmig-key-recovery/1"
_KEY_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class AgentAttestationError(AttestError):
    """The agent's attestation set-up, sealed keys or reseal failed (one-line message)."""


# ------------------------------------------------------------------ state layout
def attest_dir(cfg: HostConfig) -> Path:
    return cfg.state_dir / "attest"


def keys_dir(cfg: HostConfig) -> Path:
    return cfg.state_dir / "keys"


def _event_log_path(cfg: HostConfig) -> Path:
    return attest_dir(cfg) / "eventlog.json"


def _identity_path(cfg: HostConfig) -> Path:
    return attest_dir(cfg) / "identity.json"


def _results_path(cfg: HostConfig) -> Path:
    return attest_dir(cfg) / "last-results.json"


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _StateLock:
    """Exclusive hold on a host's TPM state: one agent at a time, and reseal only while no agent
    runs (two swtpm processes on one NVRAM directory would corrupt it)."""

    def __init__(self, cfg: HostConfig) -> None:
        path = attest_dir(cfg) / "agent.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise AgentAttestationError(
                f"the TPM state of host {cfg.name!r} ({cfg.state_dir}) is in use by a running "
                "agent or reseal; stop it first"
            ) from None

    @staticmethod
    def is_held(cfg: HostConfig) -> bool:
        path = attest_dir(cfg) / "agent.lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _open_host_tpm(cfg: HostConfig) -> HostTpm:
    setting = cfg.attestation.tpm
    if setting == "device" and not TPM_DEVICE.exists():
        raise AgentAttestationError(
            f"attestation.tpm = 'device' but {TPM_DEVICE} does not exist; "
            "use tpm = 'auto' or 'swtpm' on hosts without a TPM"
        )
    return open_tpm(cfg.state_dir / "tpm", prefer_device=setting != "swtpm")


def close_tpm(tpm: HostTpm) -> None:
    """Close the TPM, first telling a supervised swtpm about the shutdown (TPM2_Shutdown CLEAR).

    Why: stopping swtpm without an orderly shutdown is a power loss to the TPM, and the TPM's
    dictionary-attack logic counts every such restart as a failed authorization; after three
    agent restarts the TPM locks out sealing and unsealing. A hardware TPM is shut down by the
    OS at reboot, so the agent never sends it this command.
    """
    if tpm.kind == "swtpm":
        lock, ectx = getattr(tpm, "_lock", None), getattr(tpm, "_ectx", None)
        if lock is not None and ectx is not None and not getattr(tpm, "_closed", True):
            with lock, contextlib.suppress(Exception):  # best effort: the process stops anyway
                ectx.shutdown(TPM2_SU.CLEAR)
    tpm.close()


def _check_ca_key(ca_public_key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(ca_public_key, ec.EllipticCurvePublicKey) or not isinstance(
        ca_public_key.curve, ec.SECP256R1
    ):
        raise AgentAttestationError(
            "ca_public_key must be the cluster CA's ECDSA P-256 public key (ca.pem)"
        )
    return ca_public_key


def ak_fingerprint(ak_public_pem: bytes | str) -> str:
    """sha256 of the AK's DER SubjectPublicKeyInfo (hex): what admins compare out of band."""
    pem = ak_public_pem.encode() if isinstance(ak_public_pem, str) else ak_public_pem
    der = serialization.load_pem_public_key(pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


# ------------------------------------------------------------------ key files
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(doc: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(doc[key], validate=True)


def _aad(fmt: str, host: str, name: str) -> bytes:
    return f"{fmt}|{host}|{name}".encode()


def _check_key_name(name: str) -> None:
    if not _KEY_NAME.match(name):
        raise AgentAttestationError(
            f"sealed key name {name!r} is invalid; use 1-63 of a-z 0-9 . _ - (e.g. 'audit-signing')"
        )


def _ecies_kdf(shared: bytes, ephemeral: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"trustmig key recovery/1" + ephemeral
    ).derive(shared)


def encrypt_recovery(
    secret: bytes, recipient: ec.EllipticCurvePublicKey, *, host: str, name: str
) -> bytes:
    """ECIES-encrypt ``secret`` to the CA public key (bound to host and key name)."""
    eph = ec.generate_private_key(ec.SECP256R1())
    eph_pub = eph.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    key = _ecies_kdf(eph.exchange(ec.ECDH(), recipient), eph_pub)
    nonce = os.urandom(12)
    ct = AESGCM(key).encrypt(nonce, secret, _aad(RECOVERY_FORMAT, host, name))
    doc = {
        "format": RECOVERY_FORMAT,
        "host": host,
        "name": name,
        "recipient_key_id": key_id(recipient),
        "ephemeral": _b64(eph_pub),
        "nonce": _b64(nonce),
        "ciphertext": _b64(ct),
    }
    return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"


def decrypt_recovery(
    data: bytes, ca_key: ec.EllipticCurvePrivateKey, *, host: str, name: str, path: Path
) -> bytes:
    """Recover a secret with the CA private key; refuses files of another host or key name."""
    try:
        doc = json.loads(data)
        if doc.get("format") != RECOVERY_FORMAT:
            raise ValueError("format")
        eph_pub, nonce, ct = (
            _unb64(doc, "ephemeral"),
            _unb64(doc, "nonce"),
            _unb64(doc, "ciphertext"),
        )
        eph = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), eph_pub)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AgentAttestationError(
            f"{path} is not a {RECOVERY_FORMAT} file; restore it from backup"
        ) from None
    key = _ecies_kdf(ca_key.exchange(ec.ECDH(), eph), eph_pub)
    try:
        return AESGCM(key).decrypt(nonce, ct, _aad(RECOVERY_FORMAT, host, name))
    except InvalidTag:
        raise AgentAttestationError(
            f"{path} does not decrypt with CA key {key_id(ca_key.public_key())} (it is for key "
            f"{doc.get('recipient_key_id')!s}, host {doc.get('host')!s}); pass the CA directory "
            "that was in use when the key was created"
        ) from None


def _seal_secret(
    tpm: HostTpm, secret: bytes, *, host: str, name: str, pcr_values: dict[int, bytes] | None
) -> bytes:
    kek = AESGCM.generate_key(bit_length=256)
    blob = tpm.seal(kek, SEAL_PCRS, pcr_values=pcr_values)
    nonce = os.urandom(12)
    ct = AESGCM(kek).encrypt(nonce, secret, _aad(SEALED_KEY_FORMAT, host, name))
    doc = {
        "format": SEALED_KEY_FORMAT,
        "host": host,
        "name": name,
        "pcrs": list(SEAL_PCRS),
        "tpm_blob": _b64(blob),
        "nonce": _b64(nonce),
        "ciphertext": _b64(ct),
        "sealed_at": time.time(),
    }
    return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"


def _unseal_secret(tpm: HostTpm, data: bytes, *, host: str, name: str, path: Path) -> bytes:
    try:
        doc = json.loads(data)
        if doc.get("format") != SEALED_KEY_FORMAT:
            raise ValueError("format")
        blob, nonce, ct = _unb64(doc, "tpm_blob"), _unb64(doc, "nonce"), _unb64(doc, "ciphertext")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AgentAttestationError(
            f"{path} is not a {SEALED_KEY_FORMAT} file; restore it or run 'trustmig host reseal'"
        ) from None
    kek = tpm.unseal(blob)  # UnsealRefused (an AttestError) carries the operator message
    try:
        return AESGCM(kek).decrypt(nonce, ct, _aad(SEALED_KEY_FORMAT, host, name))
    except InvalidTag:
        raise AgentAttestationError(
            f"{path} was altered or belongs to another host/key; restore it or run "
            "'trustmig host reseal'"
        ) from None


# ------------------------------------------------------------------ trust data, re-read on change
class _Reloading:
    """Registry and reference values, re-read when their files change (hosts enroll and admins
    approve software while agents run)."""

    def __init__(self, cfg: HostConfig, ca_public_key: ec.EllipticCurvePublicKey) -> None:
        self._cfg = cfg
        self._ca = ca_public_key
        self._lock = threading.Lock()
        self._reg_stamp: tuple[int, int, int] | None = None
        self._rv_stamp: tuple[int, int, int] | None = None
        self.registry = AkRegistry(cfg.attestation.registry)
        self.refvalues = RefValues()
        self.get()

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def get(self) -> tuple[AkRegistry, RefValues]:
        with self._lock:
            reg_path, rv_path = self._cfg.attestation.registry, self._cfg.attestation.refvalues
            stamp = self._stamp(reg_path)
            if stamp != self._reg_stamp or stamp is None:
                self.registry = AkRegistry.load(reg_path)
                self._reg_stamp = stamp
            stamp = self._stamp(rv_path)
            if stamp != self._rv_stamp or stamp is None:
                self.refvalues = load_refvalues(rv_path, self._ca)
                self._rv_stamp = stamp
            return self.registry, self.refvalues


@dataclass
class PeerResult:
    """Outcome of the last attestation of one peer (kept for status and audit)."""

    peer: str
    ok: bool
    at: float
    summary: str
    measurement: str | None = None
    pcr_digest: str | None = None
    pcrs: dict[str, str] = field(default_factory=dict)
    measurements: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "ok": self.ok,
            "at": self.at,
            "summary": self.summary,
            "measurement": self.measurement,
            "pcr_digest": self.pcr_digest,
            "pcrs": self.pcrs,
            "measurements": self.measurements,
        }


# ------------------------------------------------------------------ the agent component
class AgentAttestation:
    """The agent's TPM, measured launch, evidence callbacks and sealed keys."""

    def __init__(
        self,
        cfg: HostConfig,
        *,
        tpm: HostTpm,
        keys: TpmKeys,
        event_log: EventLog,
        trust: _Reloading,
        ca_public_key: ec.EllipticCurvePublicKey,
        state_lock: _StateLock,
    ) -> None:
        self.cfg = cfg
        self.tpm = tpm
        self.keys = keys
        self.event_log = event_log
        self._trust = trust
        self._ca_public_key = ca_public_key
        self._state_lock = state_lock
        self._results_lock = threading.Lock()
        self.last_results: dict[str, PeerResult] = {}
        self._closed = False
        #: told every verdict on a peer's evidence and how long judging it took (the metrics)
        self.on_verdict: Callable[[bool, float], None] | None = None

    # --- start / close ----------------------------------------------------------------------------
    @classmethod
    def start(
        cls, cfg: HostConfig, *, ca_public_key: ec.EllipticCurvePublicKey, config_path: Path
    ) -> AgentAttestation:
        """Open the TPM, measure this host's software into PCRs 11-13, check enrollment.

        Blocking (about 0.1-1 s with swtpm, most of it hashing QEMU and starting swtpm).
        """
        if not cfg.attestation.enabled:
            raise AgentAttestationError(
                f"attestation is disabled for host {cfg.name!r} ([attestation] enabled = false); "
                "do not start it, or enable it in host.toml"
            )
        ca_public_key = _check_ca_key(ca_public_key)
        state_lock = _StateLock(cfg)
        tpm: HostTpm | None = None
        try:
            trust = _Reloading(cfg, ca_public_key)  # fail fast on missing/bad reference values
            items = host_launch_items(cfg, config_path)
            tpm = _open_host_tpm(cfg)
            keys = tpm.ensure_keys()
            event_log = measured_launch(tpm, items, _event_log_path(cfg))
            cls._check_enrollment(cfg, tpm, keys)
            _write_atomic(
                _identity_path(cfg),
                json.dumps(
                    {
                        "host": cfg.name,
                        "tpm_kind": tpm.kind,
                        "ak_name": keys.ak_name.hex(),
                        "ak_fingerprint": ak_fingerprint(keys.ak_public_pem),
                        "started_at": time.time(),
                    },
                    indent=1,
                ).encode(),
                0o644,
            )
            self = cls(
                cfg,
                tpm=tpm,
                keys=keys,
                event_log=event_log,
                trust=trust,
                ca_public_key=ca_public_key,
                state_lock=state_lock,
            )
        except BaseException:
            if tpm is not None:
                close_tpm(tpm)
            state_lock.release()
            raise
        log.info(
            "attestation ready: %s TPM, AK %s, %d measurements",
            tpm.kind,
            keys.ak_name.hex()[:16],
            len(event_log.events),
        )
        return self

    @staticmethod
    def _check_enrollment(cfg: HostConfig, tpm: HostTpm, keys: TpmKeys) -> None:
        registry_path = cfg.attestation.registry
        record = AkRegistry.load(registry_path).get(cfg.name)
        if record is not None and record.ak_name == keys.ak_name.hex():
            return
        if not cfg.attestation.auto_enroll:
            what = "is not enrolled" if record is None else "is enrolled with another AK"
            log.warning(
                "host %s %s in %s: peers will refuse its evidence until the security admin "
                "enrolls it",
                cfg.name,
                what,
                registry_path,
            )
            return
        log.warning(
            "self-enrolling host %s into %s (attestation.auto_enroll): for labs and demos only; "
            "in production the security admin enrolls each host",
            cfg.name,
            registry_path,
        )
        with file_lock(registry_path):
            enroll_host(cfg.name, tpm, registry_path)

    def close(self) -> None:
        """Stop the TPM connection (and our swtpm, by its PID) and release the state lock."""
        if self._closed:
            return
        self._closed = True
        try:
            close_tpm(self.tpm)
        finally:
            self._state_lock.release()

    def __enter__(self) -> AgentAttestation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- channel callbacks ------------------------------------------------------------------------
    def make_evidence(self, th: bytes) -> bytes:
        """Quote PCRs 11-13 over the handshake transcript hash, with the event log."""
        return make_evidence(self.tpm, th, self.event_log, LAUNCH_PCRS, host=self.cfg.name)

    def verify_evidence(self, peer: str, evidence: bytes, th: bytes) -> str:
        """Judge a peer's evidence; returns ``verified pcr_digest=<hex16>`` or raises
        AttestationFailed (message names the measurement when one was not approved)."""
        started = time.monotonic()
        try:
            try:
                registry, refvalues = self._trust.get()
            except AttestError as exc:  # fail closed when the trust data became unreadable
                raise AttestationFailed(f"cannot judge evidence of {peer!r}: {exc}") from None
            res = verify_evidence(
                evidence,
                peer_name=peer,
                transcript_hash=th,
                registry=registry,
                refvalues=refvalues,
            )
        except AttestationFailed as exc:
            self._record(
                PeerResult(
                    peer=peer, ok=False, at=time.time(), summary=str(exc),
                    measurement=exc.measurement,
                ),
                started,
            )  # fmt: skip
            raise
        summary = f"verified pcr_digest={res.pcr_digest[:16]}"
        if "host-capacity" in res.data:
            summary += f" capacity={res.data['host-capacity']}"
        self._record(
            PeerResult(
                peer=peer,
                ok=True,
                at=time.time(),
                summary=summary,
                pcr_digest=res.pcr_digest,
                pcrs={str(k): v for k, v in res.pcrs.items()},
                measurements=[
                    {"name": m["name"], "digest": m["digest"], "pcr": m["pcr"]}
                    for m in res.measurements
                ],
            ),
            started,
        )
        return summary

    def _record(self, result: PeerResult, started: float | None = None) -> None:
        if self.on_verdict is not None and started is not None:
            with contextlib.suppress(Exception):
                self.on_verdict(result.ok, time.monotonic() - started)
        with self._results_lock:
            self.last_results.pop(result.peer, None)
            self.last_results[result.peer] = result
            while len(self.last_results) > MAX_RESULTS:
                del self.last_results[next(iter(self.last_results))]
            doc = {p: r.to_dict() for p, r in self.last_results.items()}
            with contextlib.suppress(OSError):  # status file is a convenience, never fatal
                _write_atomic(_results_path(self.cfg), json.dumps(doc, indent=1).encode(), 0o644)

    # --- status -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Live view for ``trustmig host status --json``: TPM, AK, PCRs, event log, last results."""
        pcrs = self.tpm.pcr_read(LAUNCH_PCRS)
        registry, _ = self._trust.get()
        record = registry.get(self.cfg.name)
        with self._results_lock:
            results = {p: r.to_dict() for p, r in self.last_results.items()}
        return {
            "host": self.cfg.name,
            "running": True,
            "tpm": {"kind": self.tpm.kind},
            "ak": {
                "name": self.keys.ak_name.hex(),
                "fingerprint": ak_fingerprint(self.keys.ak_public_pem),
                "enrolled": record is not None and record.ak_name == self.keys.ak_name.hex(),
            },
            "pcrs": {str(i): v.hex() for i, v in sorted(pcrs.items())},
            "event_log": [e.to_dict() for e in self.event_log.events],
            "sealed_keys": _sealed_key_status(self.cfg),
            "last_results": results,
        }

    # --- sealed keys ------------------------------------------------------------------------------
    def unseal_or_create(self, name: str, create: Callable[[], bytes]) -> bytes:
        """The secret ``name``: unsealed from ``keys/<name>.sealed`` if present, else made by
        ``create()``, sealed to PCRs 11+12 and escrowed to the CA (``keys/<name>.recovery``).

        Raises AttestError ("unseal refused: ...") when the measured software changed since the
        secret was sealed.
        """
        _check_key_name(name)
        kdir = keys_dir(self.cfg)
        sealed, recovery = kdir / f"{name}.sealed", kdir / f"{name}.recovery"
        if sealed.exists():
            return _unseal_secret(
                self.tpm, sealed.read_bytes(), host=self.cfg.name, name=name, path=sealed
            )
        if recovery.exists():
            raise AgentAttestationError(
                f"{sealed} is missing but {recovery} exists; run 'trustmig host reseal' to restore "
                "the sealed key instead of creating a new one"
            )
        secret = create()
        if not isinstance(secret, bytes) or not secret:
            raise AgentAttestationError(
                f"creating sealed key {name!r} returned no bytes; the create callback must return "
                "the secret (e.g. PEM bytes)"
            )
        kdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(
            recovery,
            encrypt_recovery(secret, self._ca_public_key, host=self.cfg.name, name=name),
        )
        _write_atomic(
            sealed, _seal_secret(self.tpm, secret, host=self.cfg.name, name=name, pcr_values=None)
        )
        log.info("created sealed key %s (PCRs %s) with CA recovery copy", name, list(SEAL_PCRS))
        return secret

    def seal_new(self, name: str, secret: bytes) -> None:
        """Seal ``secret`` as ``name`` (replacing any earlier copy) with a CA recovery copy.

        Used when an administrator hands the host a new secret, e.g. the identity key written
        by ``trustmig host enroll``: the agent adopts it and the plaintext file is removed.
        """
        _check_key_name(name)
        if not secret:
            raise AgentAttestationError(f"sealed key {name!r} would be empty; nothing to seal")
        kdir = keys_dir(self.cfg)
        kdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(
            kdir / f"{name}.recovery",
            encrypt_recovery(secret, self._ca_public_key, host=self.cfg.name, name=name),
        )
        _write_atomic(
            kdir / f"{name}.sealed",
            _seal_secret(self.tpm, secret, host=self.cfg.name, name=name, pcr_values=None),
        )
        log.info("sealed %s to PCRs %s with CA recovery copy", name, list(SEAL_PCRS))

    def forget(self, name: str) -> bool:
        """Delete the sealed secret ``name`` and its CA recovery copy (the secret moved to
        another host, or its use ended); True if there was one."""
        _check_key_name(name)
        kdir = keys_dir(self.cfg)
        found = False
        for suffix in (".sealed", ".recovery"):
            path = kdir / f"{name}{suffix}"
            if path.exists():
                path.unlink()
                found = True
        return found

    def unseal(self, name: str) -> bytes | None:
        """The sealed secret ``name``, or None when it was never sealed on this host.

        Raises AttestError ("unseal refused: ...") when the measured software changed."""
        _check_key_name(name)
        sealed = keys_dir(self.cfg) / f"{name}.sealed"
        if not sealed.exists():
            return None
        return _unseal_secret(
            self.tpm, sealed.read_bytes(), host=self.cfg.name, name=name, path=sealed
        )

    # --- authorized upgrade -----------------------------------------------------------------------
    @staticmethod
    def enroll_tpm(
        cfg: HostConfig, *, replace: bool = False, ek_ca_certs: list[bytes] | None = None
    ) -> dict[str, Any]:
        """The security admin's enrollment of this host's TPM (agent stopped): a credential
        challenge proves the AK lives in the TPM whose EK is recorded, then the AK goes into
        ``[attestation] registry``, which every peer must then receive."""
        state_lock = _StateLock(cfg)
        try:
            tpm = _open_host_tpm(cfg)
            try:
                rec = enroll_host(cfg.name, tpm, cfg.attestation.registry,
                                  ek_ca_certs=ek_ca_certs, replace=replace)  # fmt: skip
            finally:
                close_tpm(tpm)
        finally:
            state_lock.release()
        return {"host": rec.host, "ak_name": rec.ak_name, "registry": str(cfg.attestation.registry),
                "enrolled_at": rec.enrolled_at}  # fmt: skip

    @staticmethod
    def reseal(
        cfg: HostConfig, *, config_path: Path, ca_private_key: ec.EllipticCurvePrivateKey
    ) -> dict[str, Any]:
        """Re-seal every key of the host to the software now installed (agent stopped).

        Authorized means: every current measurement is in the CA-signed reference values. The
        secrets come from the ``.recovery`` files (decrypted with the CA key); they are sealed
        to the PCR values a fresh launch of the current software produces (predicted by replay,
        no PCR is touched). On a hardware TPM, reboot before starting the agent again so the
        PCRs start from zero.
        """
        if not isinstance(ca_private_key, ec.EllipticCurvePrivateKey):
            raise AgentAttestationError("reseal needs the cluster CA's ECDSA private key (ca.key)")
        ca_pub = _check_ca_key(ca_private_key.public_key())
        state_lock = _StateLock(cfg)
        try:
            refvalues = load_refvalues(cfg.attestation.refvalues, ca_pub)
            items = host_launch_items(cfg, config_path)
            for name, digest, detail in items:
                if name not in DATA_EVENTS and refvalues.lookup(name, digest) is None:
                    raise AgentAttestationError(
                        f"reseal refused: {name} sha256:{digest.hex()[:12]} ({detail}) is not in "
                        "the reference values; approve it with 'trustmig refvalues add "
                        f"--from-host-config {config_path} --ca-dir CA_DIR' first"
                    )
            predicted = predict_pcrs(items, SEAL_PCRS)
            recoveries = sorted(keys_dir(cfg).glob("*.recovery"))
            resealed: list[str] = []
            if recoveries:
                tpm = _open_host_tpm(cfg)
                try:
                    for path in recoveries:
                        key_name = path.name.removesuffix(".recovery")
                        secret = decrypt_recovery(
                            path.read_bytes(), ca_private_key, host=cfg.name, name=key_name,
                            path=path,
                        )  # fmt: skip
                        blob = _seal_secret(
                            tpm, secret, host=cfg.name, name=key_name, pcr_values=predicted
                        )
                        _write_atomic(path.with_name(f"{key_name}.sealed"), blob)
                        resealed.append(key_name)
                finally:
                    close_tpm(tpm)
        finally:
            state_lock.release()
        log.info(
            "resealed %s to PCRs %s", resealed, {p: v.hex()[:16] for p, v in predicted.items()}
        )
        return {
            "host": cfg.name,
            "resealed": resealed,
            "pcrs": {str(p): v.hex() for p, v in predicted.items()},
            "measurements": [
                {"name": n, "digest": d.hex(), "detail": detail} for n, d, detail in items
            ],
        }


# ------------------------------------------------------------------ offline status
def _sealed_key_status(cfg: HostConfig) -> list[dict[str, Any]]:
    kdir = keys_dir(cfg)
    if not kdir.is_dir():
        return []
    names = sorted({p.name.rsplit(".", 1)[0] for p in kdir.glob("*.sealed")} |
                   {p.name.rsplit(".", 1)[0] for p in kdir.glob("*.recovery")})  # fmt: skip
    out = []
    for n in names:
        sealed = kdir / f"{n}.sealed"
        pcrs: list[int] = []
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            pcrs = list(json.loads(sealed.read_bytes())["pcrs"])
        out.append(
            {
                "name": n,
                "sealed": sealed.exists(),
                "recovery": (kdir / f"{n}.recovery").exists(),
                "pcrs": pcrs,
            }
        )
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise AgentAttestationError(
            f"{path} is unreadable or not JSON; delete it and restart"
        ) from None


def offline_status(cfg: HostConfig) -> dict[str, Any]:
    """What the state directory says about attestation, without touching the TPM (the running
    agent owns it): identity, enrollment, last event log, sealed keys, last peer results."""
    identity = _read_json(_identity_path(cfg)) or {}
    record = AkRegistry.load(cfg.attestation.registry).get(cfg.name)
    log_doc = _read_json(_event_log_path(cfg))
    events = EventLog.from_dict(log_doc).events if log_doc is not None else []
    replayed = EventLog(list(events)).replay()
    return {
        "host": cfg.name,
        "running": _StateLock.is_held(cfg),
        "tpm": {"kind": identity.get("tpm_kind"), "setting": cfg.attestation.tpm},
        "ak": {
            "name": identity.get("ak_name"),
            "fingerprint": identity.get("ak_fingerprint"),
            "enrolled": record is not None and record.ak_name == identity.get("ak_name"),
            "registry": str(cfg.attestation.registry),
            "enrolled_at": record.enrolled_at if record is not None else None,
        },
        "pcrs": {str(p): replayed.get(p, bytes(32)).hex() for p in LAUNCH_PCRS},
        "pcrs_source": "event log replay (last launch)",
        "event_log": [e.to_dict() for e in events],
        "sealed_keys": _sealed_key_status(cfg),
        "last_results": _read_json(_results_path(cfg)) or {},
    }
