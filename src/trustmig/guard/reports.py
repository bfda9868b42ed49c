"""Measured load: a host's signed report of what its VMs really use, and the checks on it.

The field's placement systems act on what hosts say about themselves. trustmig's planner acts on
a host's figures only when they pass three tests: the report is signed by the host's key and
bound to the asker's nonce; its capacity is within what the host's TPM quote attests (the
``host-capacity`` measurement, PCR-bound); and it accounts for every VM the cluster's records
say runs there, at least at the size they were admitted with. A report that fails the second or
third test is a lie (rules in :data:`LYING_RULES`): its host is quarantined, not merely skipped.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.guard.claims import FUTURE_SKEW_S, AttestedCapacity
from trustmig.guard.errors import ClaimError
from trustmig.guard.rules import Verdict

_REPORT_DOMAIN = b"trustmig-host-report-v1\n"
#: rules whose failure means the host lied (quarantine), not that the report was late or garbled
LYING_RULES = frozenset({"report_exceeds_attested", "report_hides_vm", "report_impossible"})
#: a report may list at most this many VMs (bounds the work of checking one)
MAX_VMS = 4096


@dataclass(frozen=True)
class VmUse:
    """One guest as its host measured it: admitted size, resident memory and CPU in cores,
    and (for placement) its tenant and the co-residency rules of its verified policy."""

    name: str
    mem_mib: int
    vcpus: int
    rss_mib: int
    cpu_cores: float
    tenant: str = ""
    neighbours: str = "any"
    never_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostReport:
    """What a host measured of itself and its guests, signed with its identity key."""

    host: str
    nonce: str
    ts: float
    total_mem_mib: int
    total_vcpus: int
    host_cpu_cores: float
    vms: tuple[VmUse, ...]

    def canonical_bytes(self) -> bytes:
        """Deterministic encoding that is signed: domain tag + sorted compact JSON."""
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), allow_nan=True)
        return _REPORT_DOMAIN + body.encode("utf-8")

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["vms"] = list(doc["vms"])
        return doc

    @classmethod
    def from_json(cls, data: Any) -> HostReport:
        """Parse the JSON form; raises ClaimError naming what is wrong."""
        if not isinstance(data, dict):
            raise ClaimError("host report is not an object; send the fields of HostReport")
        expected = set(cls.__dataclass_fields__)
        if set(data) != expected:
            raise ClaimError(f"host report fields wrong: expected exactly {sorted(expected)}")
        raw_vms = data["vms"]
        if not isinstance(raw_vms, list | tuple) or len(raw_vms) > MAX_VMS:
            raise ClaimError(f"host report 'vms' must be a list of at most {MAX_VMS} entries")
        required = {"name", "mem_mib", "vcpus", "rss_mib", "cpu_cores"}
        optional = set(VmUse.__dataclass_fields__) - required
        vms = []
        for v in raw_vms:
            if not isinstance(v, dict) or not required <= set(v) <= required | optional:
                raise ClaimError(f"host report VM entry wrong: expected {sorted(required)} "
                                 f"and optionally {sorted(optional)}")  # fmt: skip
            never = v.get("never_with", ())
            if not isinstance(never, list | tuple) or not all(isinstance(t, str) for t in never):
                raise ClaimError("host report VM entry: never_with must be a list of tenants")
            vms.append(VmUse(**{**v, "never_with": tuple(never)}))
        return cls(**{**data, "vms": tuple(vms)})


def sign_report(report: HostReport, key: ec.EllipticCurvePrivateKey) -> bytes:
    """ECDSA-SHA256 (DER) over :meth:`HostReport.canonical_bytes`."""
    return key.sign(report.canonical_bytes(), ec.ECDSA(hashes.SHA256()))


def verify_report_signature(
    report: HostReport, sig: bytes, public_key: ec.EllipticCurvePublicKey
) -> None:
    """Raise ClaimError unless ``sig`` is the host key's signature over ``report``."""
    try:
        public_key.verify(sig, report.canonical_bytes(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ClaimError(
            f"host report from {report.host} has a bad signature; it was altered or signed "
            "with another key"
        ) from None


def _refuse(rule: str, reason: str) -> Verdict:
    return Verdict(accept=False, rule=rule, reason=reason)


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53


def _amount(v: object) -> bool:
    """A finite, non-negative number of sane size (a huge integer is no amount)."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v) and 0 <= v < 1e15
    except OverflowError:
        return False


def _malformed(r: HostReport) -> str | None:
    if not isinstance(r.host, str) or not r.host or not isinstance(r.nonce, str):
        return "host and nonce must be non-empty strings"
    for name in ("total_mem_mib", "total_vcpus"):
        if not _count(getattr(r, name)):
            return f"{name} must be a non-negative integer"
    if not _amount(r.ts) or not _amount(r.host_cpu_cores):
        return "ts and host_cpu_cores must be finite non-negative numbers"
    names = set()
    for v in r.vms:
        if not isinstance(v.name, str) or not v.name or v.name in names:
            return "every VM needs a distinct, non-empty name"
        names.add(v.name)
        if not all(_count(x) for x in (v.mem_mib, v.vcpus, v.rss_mib)) or not _amount(v.cpu_cores):
            return f"VM {v.name}: sizes must be non-negative integers, cpu_cores a number"
    return None


def check_report(
    report: HostReport,
    *,
    attested: AttestedCapacity,
    known: dict[str, tuple[int, int]],
    now: float,
    expected_nonce: str,
    max_age_s: float = 30.0,
) -> Verdict:
    """Accept a host's measured load only if it is fresh and agrees with what was verified.

    ``known`` maps each VM the cluster's records place on this host to its admitted (memory
    MiB, vCPUs). Rules, first failure wins: ``report_malformed``, ``report_nonce``,
    ``report_stale``, ``report_exceeds_attested`` (capacity above the attested one),
    ``report_hides_vm`` (a known VM missing or smaller than admitted), ``report_impossible``
    (guests using more memory or CPU than the attested host has)."""
    h = report.host
    problem = _malformed(report)
    if problem is not None:
        return _refuse("report_malformed", f"host {h} report: {problem}")
    if report.nonce != expected_nonce:
        return _refuse("report_nonce", f"host {h} answered another request (nonce mismatch)")
    if report.ts > now + FUTURE_SKEW_S or now - report.ts > max_age_s:
        return _refuse("report_stale", f"host {h} report is {now - report.ts:.0f} s old")
    if report.total_mem_mib > attested.mem_mib or report.total_vcpus > attested.vcpus:
        return _refuse(
            "report_exceeds_attested",
            f"host {h} reports {report.total_mem_mib} MiB / {report.total_vcpus} vCPUs, its "
            f"attested capacity is {attested.mem_mib} MiB / {attested.vcpus} vCPUs",
        )
    listed = {v.name: v for v in report.vms}
    for name, (mem, vcpus) in sorted(known.items()):
        got = listed.get(name)
        if got is None or got.mem_mib < mem or got.vcpus < vcpus:
            return _refuse("report_hides_vm", f"host {h} does not account for VM {name} "
                           f"({mem} MiB, {vcpus} vCPUs) that the cluster placed there")  # fmt: skip
    rss = sum(v.rss_mib for v in report.vms)
    cores = max(report.host_cpu_cores, sum(v.cpu_cores for v in report.vms))
    if rss > attested.mem_mib or cores > attested.vcpus * 1.1 + 0.5:
        return _refuse("report_impossible", f"host {h} reports guests using {rss} MiB and "
                       f"{cores:.1f} cores, beyond its attested capacity")  # fmt: skip
    return Verdict(accept=True, rule="report_ok", reason=f"host {h} report agrees")
