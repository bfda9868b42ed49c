"""Remote attestation bound to the secure channel's handshake.

The attester quotes its launch PCRs with the channel's 32-byte transcript hash as qualifying data,
so the quote is fresh and belongs to *this* connection: replaying an old quote, or relaying one
from another connection, fails the nonce check. The verifier checks with `cryptography` only.
"""

from __future__ import annotations

import hmac
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.attest.enroll import AkRegistry
from trustmig.attest.errors import AttestationFailed, AttestError
from trustmig.attest.measure import (
    DATA_EVENTS,
    LAUNCH_PCRS,
    PCR_MAP,
    REQUIRED_EVENTS,
    EventLog,
    data_event_digest,
)
from trustmig.attest.refvalues import RefValues
from trustmig.attest.tpm import HostTpm, Quote
from trustmig.attest.tpmwire import (
    ALG_SHA256,
    check_ak_attributes,
    parse_ak_public,
    parse_quote_attest,
    pcr_composite_digest,
)

EVIDENCE_FORMAT = "trustmig-evidence/1"
_ZERO = bytes(32)


@dataclass(frozen=True)
class AttestationResult:
    host: str
    ok: bool
    pcr_digest: str
    pcrs: dict[int, str]
    measurements: list[dict[str, Any]] = field(default_factory=list)
    elapsed_ms: float = 0.0
    reset_count: int = 0
    restart_count: int = 0
    #: Attested data events (name -> detail text), e.g. the host's capacity.
    data: dict[str, str] = field(default_factory=dict)


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def make_evidence(
    tpm: HostTpm,
    transcript_hash: bytes,
    event_log: EventLog,
    pcrs: Sequence[int] = LAUNCH_PCRS,
    *,
    host: str | None = None,
) -> bytes:
    """Quote `pcrs` over the transcript hash and package it with the event log (canonical JSON)."""
    if not 16 <= len(transcript_hash) <= 64:
        raise AttestError(
            f"transcript hash is {len(transcript_hash)} bytes; pass the channel's 32-byte hash"
        )
    quote = tpm.quote(transcript_hash, pcrs)
    doc = {
        "format": EVIDENCE_FORMAT,
        "host": host if host is not None else socket.gethostname(),
        "quote": quote.to_dict(),
        "event_log": event_log.to_dict(),
    }
    return _canonical(doc)


def _fail(msg: str, measurement: str | None = None) -> AttestationFailed:
    return AttestationFailed(msg, measurement=measurement)


def verify_evidence(
    evidence: bytes,
    *,
    peer_name: str,
    transcript_hash: bytes,
    registry: AkRegistry,
    refvalues: RefValues,
) -> AttestationResult:
    """Accept the evidence only if all checks pass; otherwise raise AttestationFailed.

    `peer_name` is the identity the channel authenticated (certificate name), never the name the
    evidence claims. Checks, in order: enrolled AK for peer_name; signature with that AK; quote
    structure; nonce == transcript hash; PCR digest == reported values; event log replays to those
    values; every measurement is a reference value.
    """
    t0 = time.perf_counter()
    try:
        doc = json.loads(evidence)
        if not isinstance(doc, dict) or doc.get("format") != EVIDENCE_FORMAT:
            raise ValueError("format")
        claimed = doc["host"]
        quote = Quote.from_dict(doc["quote"])
        log = EventLog.from_dict(doc["event_log"])
    except (ValueError, KeyError, TypeError, AttestError):
        raise _fail(
            f"evidence from {peer_name!r} is not a {EVIDENCE_FORMAT} document; "
            "the peer must send make_evidence output"
        ) from None

    record = registry.get(peer_name)
    if record is None:
        raise _fail(f"host {peer_name!r} is not enrolled; enroll it before migrating to or from it")
    if claimed != peer_name:
        raise _fail(
            f"evidence names host {claimed!r} but the channel peer is {peer_name!r}; refusing "
            "evidence relayed from another host"
        )
    try:
        ak = parse_ak_public(record.ak_public_bytes)
        check_ak_attributes(ak.attributes)
    except AttestError as exc:
        raise _fail(
            f"registered AK of {peer_name!r} is unusable ({exc}); re-enroll the host"
        ) from None

    try:
        ak.key.verify(quote.signature, quote.attest, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise _fail(
            f"quote signature does not verify with the enrolled AK of {peer_name!r}; the quote "
            "was signed by another TPM or altered"
        ) from None

    try:
        info = parse_quote_attest(quote.attest)
    except AttestError as exc:
        raise _fail(f"quote from {peer_name!r} refused: {exc}") from None
    if not hmac.compare_digest(info.extra_data, transcript_hash):
        raise _fail(
            f"quote from {peer_name!r} is over another nonce (stale or from another connection); "
            "the peer must quote this handshake's transcript hash"
        )
    selected = sorted(p for alg, ps in info.pcr_select if alg == ALG_SHA256 for p in ps)
    if any(alg != ALG_SHA256 and ps for alg, ps in info.pcr_select) or selected != sorted(
        quote.pcrs
    ):
        raise _fail(
            f"quote from {peer_name!r} selects PCRs {selected} but reports {sorted(quote.pcrs)}; "
            "the peer must report the quoted sha256 PCRs"
        )
    if not hmac.compare_digest(pcr_composite_digest(quote.pcrs), info.pcr_digest):
        raise _fail(f"reported PCR values of {peer_name!r} do not match the signed PCR digest")

    replayed = log.replay()
    for pcr in sorted(set(replayed) | set(quote.pcrs)):
        if pcr not in quote.pcrs:
            raise _fail(f"event log of {peer_name!r} measures PCR {pcr}, which is not quoted")
        if replayed.get(pcr, _ZERO) != quote.pcrs[pcr]:
            raise _fail(
                f"event log of {peer_name!r} does not replay to quoted PCR {pcr}; the log was "
                "altered or is incomplete"
            )

    measurements: list[dict[str, Any]] = []
    data: dict[str, str] = {}
    names = {ev.name for ev in log.events}
    missing = sorted(REQUIRED_EVENTS - names)
    if missing:
        raise _fail(
            f"event log of {peer_name!r} lacks the measurements {missing}; every trustmig host "
            "measures them at launch",
            measurement=missing[0],
        )
    for ev in log.events:
        if ev.name in DATA_EVENTS:
            if ev.pcr != PCR_MAP[ev.name] or ev.name in data:
                raise _fail(
                    f"{ev.name} event of {peer_name!r} is in PCR {ev.pcr} or repeated; a host "
                    f"records it once, in PCR {PCR_MAP[ev.name]}",
                    measurement=ev.name,
                )
            if not hmac.compare_digest(data_event_digest(ev.name, ev.detail), ev.digest):
                raise _fail(
                    f"{ev.name} event of {peer_name!r} does not match its digest; the event log "
                    "was altered",
                    measurement=ev.name,
                )
            data[ev.name] = ev.detail
            continue
        ref = refvalues.lookup(ev.name, ev.digest)
        if ref is None:
            raise _fail(
                f"{ev.name} sha256:{ev.digest.hex()[:12]} ({ev.detail}) of {peer_name!r} "
                "not in reference values; add it only if this software is approved",
                measurement=ev.name,
            )
        measurements.append(
            {
                "pcr": ev.pcr,
                "name": ev.name,
                "digest": ev.digest.hex(),
                "detail": ev.detail,
                "comment": ref.comment,
            }
        )

    return AttestationResult(
        host=peer_name,
        ok=True,
        pcr_digest=info.pcr_digest.hex(),
        pcrs={i: v.hex() for i, v in sorted(quote.pcrs.items())},
        measurements=measurements,
        elapsed_ms=(time.perf_counter() - t0) * 1e3,
        reset_count=info.reset_count,
        restart_count=info.restart_count,
        data=data,
    )
