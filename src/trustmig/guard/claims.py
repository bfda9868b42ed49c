"""Honest resource claims: a destination's signed statement of free capacity, and its checks.

A compromised or misconfigured destination can attract migrations by over-stating free memory
or CPUs (then fail them, or starve the guests it receives). The source therefore only trusts a
claim that is signed by the destination's key, fresh, internally consistent and within what
the destination's *attested* configuration can hold; hosts caught lying are quarantined.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.guard.errors import ClaimError, QuarantineError
from trustmig.guard.rules import Verdict

#: Allowed clock skew for claims stamped slightly in the future (seconds).
FUTURE_SKEW_S = 5.0
#: How many lifted quarantines the file remembers (who cleared what, for review).
CLEARED_HISTORY = 100
_CLAIM_DOMAIN = b"trustmig-resource-claim-v1\n"


@dataclass(frozen=True)
class ResourceClaim:
    """Free capacity a host claims; ``load`` is CPU utilisation as a fraction in [0, 1]."""

    host: str
    free_mem_mib: int
    free_vcpus: int
    load: float
    total_mem_mib: int
    total_vcpus: int
    ts: float
    nonce: str

    def canonical_bytes(self) -> bytes:
        """Deterministic encoding that is signed: domain tag + sorted compact JSON."""
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), allow_nan=True)
        return _CLAIM_DOMAIN + body.encode("utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResourceClaim:
        """Build a claim from its JSON form, naming the first missing or extra field."""
        expected = set(cls.__dataclass_fields__)
        missing = expected - set(data)
        extra = set(data) - expected
        if missing or extra:
            raise ClaimError(
                f"resource claim fields wrong: missing {sorted(missing)}, unexpected "
                f"{sorted(extra)}; send exactly {sorted(expected)}"
            )
        return cls(**data)


@dataclass(frozen=True)
class AttestedCapacity:
    """What the destination's attested agent configuration says it can hold."""

    mem_mib: int
    vcpus: int


def sign_claim(claim: ResourceClaim, key: ec.EllipticCurvePrivateKey) -> bytes:
    """ECDSA-SHA256 (DER) signature over :meth:`ResourceClaim.canonical_bytes`."""
    return key.sign(claim.canonical_bytes(), ec.ECDSA(hashes.SHA256()))


def verify_claim_signature(
    claim: ResourceClaim, sig: bytes, public_key: ec.EllipticCurvePublicKey
) -> None:
    """Raise :class:`ClaimError` unless ``sig`` is the host key's signature over ``claim``."""
    try:
        public_key.verify(sig, claim.canonical_bytes(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ClaimError(
            f"resource claim from {claim.host} has a bad signature; the claim was altered or "
            "signed with another key: refuse it and check the host's key"
        ) from None


def _refuse(rule: str, reason: str) -> Verdict:
    return Verdict(accept=False, rule=rule, reason=reason)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_claim(
    claim: ResourceClaim,
    *,
    attested: AttestedCapacity,
    vm_mem_mib: int,
    vm_vcpus: int,
    now: float,
    max_age_s: float = 30,
    expected_nonce: str | None = None,
) -> Verdict:
    """Accept only a plausible, fresh claim that leaves room for the VM.

    Rules (first failure wins): ``claim_malformed`` (types, negative or NaN), ``claim_nonce``,
    ``claim_stale`` (older than ``max_age_s`` or in the future), ``claim_load``,
    ``claim_inconsistent`` (free > total), ``claim_exceeds_attested`` (total > attested),
    ``claim_insufficient`` (free < VM needs).
    """
    h = claim.host
    ints = {
        "free_mem_mib": claim.free_mem_mib,
        "free_vcpus": claim.free_vcpus,
        "total_mem_mib": claim.total_mem_mib,
        "total_vcpus": claim.total_vcpus,
    }
    for name, value in ints.items():
        if not _is_int(value) or value < 0:
            return _refuse(
                "claim_malformed",
                f"host {h} claims {name}={value!r}; it must be a non-negative integer",
            )
    for name, fvalue in (("load", claim.load), ("ts", claim.ts)):
        if (
            not isinstance(fvalue, int | float)
            or isinstance(fvalue, bool)
            or not math.isfinite(fvalue)
        ):
            return _refuse(
                "claim_malformed", f"host {h} claims {name}={fvalue!r}; it must be a finite number"
            )
    if not isinstance(claim.host, str) or not claim.host:
        return _refuse("claim_malformed", "claim has an empty host name")
    if expected_nonce is not None and claim.nonce != expected_nonce:
        return _refuse(
            "claim_nonce",
            f"host {h} answered nonce {claim.nonce!r}, not the challenge {expected_nonce!r} "
            "(replayed claim)",
        )
    age = now - claim.ts
    if age > max_age_s:
        return _refuse("claim_stale", f"claim from {h} is {age:.1f} s old (limit {max_age_s:g} s)")
    if age < -FUTURE_SKEW_S:
        return _refuse(
            "claim_stale",
            f"claim from {h} is stamped {-age:.1f} s in the future (skew limit "
            f"{FUTURE_SKEW_S:g} s); check the host clock",
        )
    if not 0.0 <= claim.load <= 1.0:
        return _refuse(
            "claim_load", f"host {h} claims load {claim.load!r}; it must be within [0, 1]"
        )
    if claim.free_mem_mib > claim.total_mem_mib or claim.free_vcpus > claim.total_vcpus:
        return _refuse(
            "claim_inconsistent",
            f"host {h} claims more free than total (memory {claim.free_mem_mib}/"
            f"{claim.total_mem_mib} MiB, vCPUs {claim.free_vcpus}/{claim.total_vcpus})",
        )
    if claim.total_mem_mib > attested.mem_mib or claim.total_vcpus > attested.vcpus:
        return _refuse(
            "claim_exceeds_attested",
            f"host {h} claims totals {claim.total_mem_mib} MiB / {claim.total_vcpus} vCPUs "
            f"beyond its attested {attested.mem_mib} MiB / {attested.vcpus} vCPUs",
        )
    if claim.free_mem_mib < vm_mem_mib or claim.free_vcpus < vm_vcpus:
        return _refuse(
            "claim_insufficient",
            f"host {h} has {claim.free_mem_mib} MiB / {claim.free_vcpus} vCPUs free; the VM "
            f"needs {vm_mem_mib} MiB / {vm_vcpus} vCPUs (insufficient)",
        )
    return Verdict(
        accept=True,
        rule="claim_ok",
        reason=f"host {h} can hold {vm_mem_mib} MiB / {vm_vcpus} vCPUs",
    )


class Quarantine:
    """JSON-file-backed set of quarantined hosts: no migrations go to or come from them.

    Every change is written atomically (temp file + rename) so a crash never leaves a
    half-written file that would silently un-quarantine a host.
    """

    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self._clock = clock
        self._hosts: dict[str, dict[str, Any]] = {}
        self._cleared: list[dict[str, Any]] = []
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise QuarantineError(
                f"quarantine file {self.path} is unreadable ({exc}); fix or restore it "
                "(it is not replaced automatically, to keep hosts quarantined)"
            ) from None
        hosts = data.get("hosts") if isinstance(data, dict) else None
        if not isinstance(hosts, dict):
            raise QuarantineError(
                f"quarantine file {self.path} has no 'hosts' object; fix or restore it"
            )
        self._hosts = hosts
        cleared = data.get("cleared", [])
        self._cleared = cleared if isinstance(cleared, list) else []

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".quarantine-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(
                    {"hosts": self._hosts, "cleared": self._cleared}, fh, indent=2, sort_keys=True
                )
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def add(self, host: str, reason: str) -> None:
        """Quarantine ``host`` (re-adding updates the reason and time)."""
        if not host or not reason:
            raise QuarantineError(
                "quarantine needs a host name and a reason; both were given empty"
            )
        self._hosts[host] = {"reason": reason, "since": self._clock()}
        self._save()

    def clear(self, host: str, by_user: str) -> None:
        """Lift the quarantine of ``host``; only a named administrator may do so."""
        if not by_user:
            raise QuarantineError(f"clearing quarantine of {host} needs the administrator's name")
        if host not in self._hosts:
            raise QuarantineError(f"host {host} is not quarantined; nothing to clear")
        entry = self._hosts.pop(host)
        self._cleared.append({"host": host, **entry, "cleared_by": by_user, "at": self._clock()})
        del self._cleared[:-CLEARED_HISTORY]
        self._save()

    def is_quarantined(self, host: str) -> str | None:
        """The quarantine reason, or None when the host is not quarantined."""
        entry = self._hosts.get(host)
        return None if entry is None else str(entry["reason"])

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Copy of all entries: host -> {reason, since}."""
        return {h: dict(v) for h, v in self._hosts.items()}

    def cleared(self) -> list[dict[str, Any]]:
        """Recently lifted quarantines with the administrator who lifted each."""
        return [dict(c) for c in self._cleared]
