"""Resource claims: signatures, each kind of lie refused with its reason, quarantine file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.guard import (
    AttestedCapacity,
    ClaimError,
    Quarantine,
    QuarantineError,
    ResourceClaim,
    check_claim,
    sign_claim,
    verify_claim_signature,
)
from trustmig.guard.rules import Verdict

NOW = 10_000.0
ATTESTED = AttestedCapacity(mem_mib=16384, vcpus=8)
HONEST = ResourceClaim(
    host="host-b",
    free_mem_mib=8192,
    free_vcpus=4,
    load=0.25,
    total_mem_mib=16384,
    total_vcpus=8,
    ts=NOW - 2,
    nonce="n-123",
)


def check(claim: ResourceClaim, **kw: object) -> Verdict:
    args: dict[str, object] = {"attested": ATTESTED, "vm_mem_mib": 2048, "vm_vcpus": 2, "now": NOW}
    args.update(kw)
    return check_claim(claim, **args)  # type: ignore[arg-type]


def test_honest_claim_accepted_and_signature_verifies() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    sig = sign_claim(HONEST, key)
    verify_claim_signature(HONEST, sig, key.public_key())
    v = check(HONEST, expected_nonce="n-123")
    assert v.accept and v.rule == "claim_ok"


def test_altered_claim_or_other_key_fails_signature() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    sig = sign_claim(HONEST, key)
    inflated = dataclasses.replace(HONEST, free_mem_mib=16000)
    with pytest.raises(ClaimError, match="bad signature"):
        verify_claim_signature(inflated, sig, key.public_key())
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ClaimError, match="host-b"):
        verify_claim_signature(HONEST, sig, other.public_key())


@pytest.mark.parametrize(
    ("change", "kw", "rule", "words"),
    [
        ({"free_mem_mib": 20000}, {}, "claim_inconsistent", "more free than total"),
        ({"free_vcpus": 9}, {}, "claim_inconsistent", "more free than total"),
        (
            {"total_mem_mib": 65536, "free_mem_mib": 60000},
            {},
            "claim_exceeds_attested",
            "beyond its attested 16384 MiB",
        ),
        ({"free_mem_mib": -1}, {}, "claim_malformed", "free_mem_mib=-1"),
        ({"load": float("nan")}, {}, "claim_malformed", "load=nan"),
        ({"ts": NOW - 31}, {}, "claim_stale", "31.0 s old (limit 30 s)"),
        ({"ts": NOW + 60}, {}, "claim_stale", "in the future"),
        ({"load": 1.5}, {}, "claim_load", "within [0, 1]"),
        ({"load": -0.1}, {}, "claim_load", "within [0, 1]"),
        ({"free_mem_mib": 1024}, {}, "claim_insufficient", "insufficient"),
        ({"free_vcpus": 1}, {}, "claim_insufficient", "needs 2048 MiB / 2 vCPUs"),
        ({}, {"expected_nonce": "other"}, "claim_nonce", "replayed"),
    ],
)
def test_each_lie_is_refused_with_its_reason(
    change: dict[str, object], kw: dict[str, object], rule: str, words: str
) -> None:
    v = check(dataclasses.replace(HONEST, **change), **kw)  # type: ignore[arg-type]
    assert not v.accept
    assert v.rule == rule
    assert words in v.reason


def test_from_dict_names_missing_fields() -> None:
    data = dataclasses.asdict(HONEST)
    assert ResourceClaim.from_dict(data) == HONEST
    del data["nonce"]
    with pytest.raises(ClaimError, match=r"missing \['nonce'\]"):
        ResourceClaim.from_dict(data)


def test_quarantine_persists_and_records_who_cleared(tmp_path: Path) -> None:
    path = tmp_path / "q" / "quarantine.json"
    q = Quarantine(path, clock=lambda: 123.0)
    assert q.is_quarantined("host-b") is None
    q.add("host-b", "claimed 64 GiB free, attested 16 GiB")
    reopened = Quarantine(path)
    assert reopened.is_quarantined("host-b") == "claimed 64 GiB free, attested 16 GiB"
    assert json.loads(path.read_text())["hosts"]["host-b"]["since"] == 123.0
    reopened.clear("host-b", by_user="admin-alice")
    again = Quarantine(path)
    assert again.is_quarantined("host-b") is None
    assert again.cleared()[0]["cleared_by"] == "admin-alice"
    with pytest.raises(QuarantineError, match="not quarantined"):
        again.clear("host-b", by_user="admin-alice")


def test_corrupt_quarantine_file_is_an_error_not_an_empty_set(tmp_path: Path) -> None:
    path = tmp_path / "quarantine.json"
    path.write_text("{not json")
    with pytest.raises(QuarantineError, match="unreadable"):
        Quarantine(path)
