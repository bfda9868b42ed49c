"""The source's verdict on a destination's signed resource claim (pure logic, real crypto)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmig.agent.capacity import capacity_detail, signed_claim
from trustmig.agent.claim_check import judge_claim
from trustmig.config import CapacitySettings
from trustmig.guard.claims import AttestedCapacity, ResourceClaim
from trustmig.hypervisor.spec import VMSpec

MID = "6bf0092e-cbf0-46a4-888b-7aa28041b07a"
ATTESTED = AttestedCapacity(mem_mib=8192, vcpus=4)
SUMMARY = f"verified pcr_digest=40241c6cf79141da capacity={capacity_detail(ATTESTED)}"


def _cert(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "host-b")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.DER)


KEY = ec.generate_private_key(ec.SECP256R1())
CERT = _cert(KEY)
MAX_AGE_S = CapacitySettings().max_claim_age_s
SPEC = VMSpec(name="vm1", memory_mib=512, vcpus=1)


def _claim(**over: object) -> ResourceClaim:
    base = ResourceClaim(host="host-b", free_mem_mib=6000, free_vcpus=3, load=0.2,
                         total_mem_mib=8192, total_vcpus=4, ts=time.time(), nonce=MID)  # fmt: skip
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


def _judge(resources: object, summary: str = SUMMARY):  # type: ignore[no-untyped-def]
    return judge_claim(
        resources, CERT, summary, SPEC, MID, require_attested=True, max_age_s=MAX_AGE_S
    )


def test_honest_claim_is_accepted() -> None:
    j = _judge(signed_claim(_claim(), KEY))
    assert j.accept and j.rule == "claim_ok" and not j.lie


def test_inflated_capacity_is_a_lie() -> None:
    j = _judge(signed_claim(_claim(total_mem_mib=65536, free_mem_mib=65536), KEY))
    assert not j.accept and j.rule == "claim_exceeds_attested" and j.lie
    assert "8192" in j.reason  # names the attested figure


def test_claim_for_another_migration_is_a_lie() -> None:
    j = _judge(signed_claim(_claim(nonce="other"), KEY))
    assert j.rule == "claim_nonce" and j.lie


def test_claim_signed_by_another_key_is_a_lie() -> None:
    j = _judge(signed_claim(_claim(), ec.generate_private_key(ec.SECP256R1())))
    assert j.rule == "claim_signature" and j.lie


def test_altered_claim_fails_its_signature() -> None:
    res = signed_claim(_claim(), KEY)
    res["claim"]["free_mem_mib"] = 8000
    assert _judge(res).rule == "claim_signature"


def test_busy_destination_is_refused_without_quarantine() -> None:
    j = _judge(signed_claim(_claim(free_mem_mib=100), KEY))
    assert j.rule == "claim_insufficient" and not j.accept and not j.lie


def test_missing_or_garbled_claims_are_verdicts_not_crashes() -> None:
    assert _judge(None).rule == "claim_missing"
    assert _judge({"claim": "x"}).rule == "claim_malformed"
    assert _judge({"claim": {"host": "b"}, "signature": "AA=="}).rule == "claim_malformed"
    assert _judge({**signed_claim(_claim(), KEY), "signature": "not base64!"}).rule == (
        "claim_malformed"
    )


def test_claim_without_attested_capacity_is_refused() -> None:
    j = _judge(signed_claim(_claim(), KEY), summary="verified pcr_digest=40241c6cf79141da")
    assert j.rule == "claim_unattested" and not j.accept
