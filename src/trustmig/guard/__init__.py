"""Availability guard for trustmig hosts.

Connection tracking and rule matching in front of every listener (:mod:`.guard`), an asyncio
front door that applies it before TLS (:mod:`.aio`), admission control for migrations
(:mod:`.admission`), nftables rendering (:mod:`.nft`) and resource-claim checks
(:mod:`.claims`). See ``docs/guard.md``.
"""

from trustmig.guard.admission import Admission, AdmissionLimits, AdmissionResult
from trustmig.guard.claims import (
    AttestedCapacity,
    Quarantine,
    ResourceClaim,
    check_claim,
    sign_claim,
    verify_claim_signature,
)
from trustmig.guard.conntrack import ConnState, TrackedConn
from trustmig.guard.errors import (
    AdmissionError,
    ClaimError,
    GuardError,
    InvalidRulesError,
    QuarantineError,
    UnknownConnectionError,
)
from trustmig.guard.guard import Guard
from trustmig.guard.nft import render_nft
from trustmig.guard.rules import GuardRules, Verdict

__all__ = [
    "Admission",
    "AdmissionError",
    "AdmissionLimits",
    "AdmissionResult",
    "AttestedCapacity",
    "ClaimError",
    "ConnState",
    "Guard",
    "GuardError",
    "GuardRules",
    "InvalidRulesError",
    "Quarantine",
    "QuarantineError",
    "ResourceClaim",
    "TrackedConn",
    "UnknownConnectionError",
    "Verdict",
    "check_claim",
    "render_nft",
    "sign_claim",
    "verify_claim_signature",
]
