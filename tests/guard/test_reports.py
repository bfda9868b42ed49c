"""Measured-load reports: signatures, parsing, and each kind of lie refused with its rule."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.guard import AttestedCapacity, ClaimError
from trustmig.guard.reports import (
    LYING_RULES,
    HostReport,
    VmUse,
    check_report,
    sign_report,
    verify_report_signature,
)
from trustmig.guard.rules import Verdict

NOW = 50_000.0
ATTESTED = AttestedCapacity(mem_mib=16384, vcpus=8)
WEB = VmUse(name="web", mem_mib=2048, vcpus=2, rss_mib=1900, cpu_cores=0.8)
DB = VmUse(name="db", mem_mib=4096, vcpus=2, rss_mib=4000, cpu_cores=1.5)
HONEST = HostReport(host="host-b", nonce="ab" * 16, ts=NOW - 1, total_mem_mib=16384,
                    total_vcpus=8, host_cpu_cores=2.3, vms=(WEB, DB))  # fmt: skip
KNOWN = {"web": (2048, 2), "db": (4096, 2)}


def check(report: HostReport, **kw: object) -> Verdict:
    args: dict[str, object] = {"attested": ATTESTED, "known": KNOWN, "now": NOW,
                               "expected_nonce": "ab" * 16}  # fmt: skip
    args.update(kw)
    return check_report(report, **args)  # type: ignore[arg-type]


def test_an_honest_report_is_accepted() -> None:
    v = check(HONEST)
    assert (v.accept, v.rule) == (True, "report_ok")


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"total_mem_mib": 16384 * 8}, "report_exceeds_attested"),
        ({"total_vcpus": 64}, "report_exceeds_attested"),
        ({"vms": (WEB,)}, "report_hides_vm"),
        ({"vms": (WEB, dataclasses.replace(DB, mem_mib=1024))}, "report_hides_vm"),
        ({"vms": (WEB, dataclasses.replace(DB, rss_mib=20000))}, "report_impossible"),
        ({"host_cpu_cores": 12.0}, "report_impossible"),
        ({"nonce": "cd" * 16}, "report_nonce"),
        ({"ts": NOW - 300}, "report_stale"),
        ({"ts": NOW + 60}, "report_stale"),
        ({"total_mem_mib": -1}, "report_malformed"),
        ({"host_cpu_cores": float("nan")}, "report_malformed"),
        ({"vms": (WEB, WEB)}, "report_malformed"),
        ({"ts": 10**400}, "report_malformed"),
        ({"host_cpu_cores": 10**400}, "report_malformed"),
        ({"total_mem_mib": 2**80}, "report_malformed"),
        ({"vms": (dataclasses.replace(WEB, rss_mib=True), DB)}, "report_malformed"),
    ],
)
def test_each_wrong_report_is_refused_by_its_rule(change: dict[str, object], rule: str) -> None:
    v = check(dataclasses.replace(HONEST, **change))  # type: ignore[arg-type]
    assert (v.accept, v.rule) == (False, rule)
    assert "host-b" in v.reason


def test_only_disagreement_with_what_was_verified_counts_as_a_lie() -> None:
    assert {"report_exceeds_attested", "report_hides_vm", "report_impossible"} == LYING_RULES
    assert "report_stale" not in LYING_RULES and "report_nonce" not in LYING_RULES


def test_a_vm_the_records_do_not_know_is_counted_not_refused() -> None:
    extra = VmUse(name="local", mem_mib=1024, vcpus=1, rss_mib=900, cpu_cores=0.1)
    assert check(dataclasses.replace(HONEST, vms=(WEB, DB, extra))).accept


def test_the_signature_covers_every_field() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    sig = sign_report(HONEST, key)
    verify_report_signature(HONEST, sig, key.public_key())
    with pytest.raises(ClaimError, match="bad signature"):
        verify_report_signature(dataclasses.replace(HONEST, vms=(WEB,)), sig, key.public_key())


def test_the_json_form_round_trips_and_names_what_is_wrong() -> None:
    assert HostReport.from_json(HONEST.to_json()) == HONEST
    doc = HONEST.to_json()
    with pytest.raises(ClaimError, match="fields wrong"):
        HostReport.from_json({**doc, "extra": 1})
    with pytest.raises(ClaimError, match="VM entry wrong"):
        HostReport.from_json({**doc, "vms": [{"name": "x"}]})
    with pytest.raises(ClaimError, match="at most"):
        HostReport.from_json({**doc, "vms": [doc["vms"][0]] * 5000})
    with pytest.raises(ClaimError, match="not an object"):
        HostReport.from_json([1, 2])
