"""The source's judgement of a destination's resource claim, and quarantine of liars.

Runs after the channel handshake (so the destination's capacity is attested) and before QEMU
sends a byte. A claim that is malformed, carries another migration's nonce, contradicts itself,
exceeds the attested capacity or is not signed by the destination's key is a lie: the host is
quarantined (refused as a destination until a security administrator clears it) and an audit
event records why. A merely stale or insufficient claim is refused without quarantine.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.agent.capacity import parse_capacity
from trustmig.guard.claims import (
    AttestedCapacity,
    ResourceClaim,
    check_claim,
    verify_claim_signature,
)
from trustmig.guard.errors import ClaimError

if TYPE_CHECKING:
    from trustmig.hypervisor.spec import VMSpec

#: Claim rules whose failure means the destination lied (as opposed to being busy or slow).
LYING_RULES = frozenset(
    {"claim_malformed", "claim_nonce", "claim_inconsistent", "claim_exceeds_attested",
     "claim_signature"}
)  # fmt: skip


@dataclass(frozen=True)
class ClaimJudgement:
    accept: bool
    rule: str
    reason: str
    claim: dict[str, Any] | None

    @property
    def lie(self) -> bool:
        return not self.accept and self.rule in LYING_RULES


def summary_field(summary: str, key: str) -> str | None:
    """A ``key=value`` token from an attestation summary (values contain no spaces)."""
    for part in summary.split():
        if part.startswith(key + "="):
            return part.split("=", 1)[1]
    return None


def judge_claim(
    resources: Any,
    peer_cert_der: bytes,
    evidence_summary: str,
    spec: VMSpec,
    migration_id: str,
    *,
    require_attested: bool,
    max_age_s: float,
) -> ClaimJudgement:
    """Apply every claim rule; never raises for bad input (a bad claim is a verdict).

    ``require_attested``: this host attests, so a peer's capacity must be attested too."""
    if not isinstance(resources, dict) or "claim" not in resources:
        return ClaimJudgement(
            False, "claim_missing", "destination sent no resource claim; upgrade its agent", None
        )
    raw = resources.get("claim")
    if not isinstance(raw, dict):
        return ClaimJudgement(False, "claim_malformed", "resource claim is not an object", None)
    try:
        claim = ResourceClaim.from_dict(dict(raw))
        sig = base64.b64decode(str(resources.get("signature", "")), validate=True)
    except (ClaimError, TypeError, ValueError, binascii.Error) as e:
        return ClaimJudgement(False, "claim_malformed", f"resource claim unreadable: {e}", None)
    key = x509.load_der_x509_certificate(peer_cert_der).public_key()
    try:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ClaimError("destination certificate has no ECDSA key")
        verify_claim_signature(claim, sig, key)
    except (ClaimError, ValueError) as e:
        return ClaimJudgement(False, "claim_signature", str(e), dict(raw))
    attested = parse_capacity(summary_field(evidence_summary, "capacity"))
    if attested is None:
        if require_attested:
            return ClaimJudgement(False, "claim_unattested",
                                  "destination's attestation carries no capacity measurement",
                                  dict(raw))  # fmt: skip
        # attestation off: nothing attested, the claim can only be checked against itself
        attested = AttestedCapacity(claim.total_mem_mib, claim.total_vcpus)
    verdict = check_claim(
        claim, attested=attested, vm_mem_mib=spec.memory_mib, vm_vcpus=spec.vcpus,
        now=time.time(), max_age_s=max_age_s,
        expected_nonce=migration_id,
    )  # fmt: skip
    return ClaimJudgement(verdict.accept, verdict.rule, verdict.reason, dict(raw))
