"""The attack lab on real guests: each attack works against QEMU's own migration and fails
against trustmig, judged from the evidence the attack collected (the lab runs once per module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trustmig.lab.report import write_reports
from trustmig.lab.runner import run_lab

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import json

    root = tmp_path_factory.mktemp("lab")
    report = run_lab(workdir=root)
    (root / "lab.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _attack(lab: dict[str, Any], name: str) -> dict[str, Any]:
    entry = next(a for a in lab["attacks"] if a["name"] == name)
    assert entry["error"] is None, entry
    assert entry["baseline_compromised"] is True, entry["baseline"]
    return entry


def _protected_guest(entry: dict[str, Any], where: str) -> None:
    """trustmig blocked it: the guest runs exactly once, where expected, memory intact."""
    assert entry["trustmig_compromised"] is False, entry["trustmig"]
    g = entry["trustmig"]["guest"]
    assert g["running_copies"] == 1 and g["where"] == where, g
    assert g["memory_intact"] is True and g["heartbeat_continued"] is True, g
    assert g["pending_incoming"] == 0, g


def test_every_attack_ran_and_the_summary_counts_them(lab: dict[str, Any]) -> None:
    assert [a["name"] for a in lab["attacks"]] == [
        "eavesdrop",
        "memory-rewrite",
        "sshd-rewrite",
        "disk-stream",
        "replay",
        "unauthorized",
        "control-plane",
        "rogue-destination",
        "false-resources",
        "false-resources-balancer",
        "co-residency",
        "inter-vm",
        "flood",
        "malformed-stream",
        "connection-abort",
    ]
    outcomes = {
        a["name"]: (a["baseline"]["outcome"], a["trustmig"]["outcome"]) for a in lab["attacks"]
    }
    assert lab["summary"] == {
        "attacks": 15,
        "baseline_compromised": 15,
        "trustmig_compromised": 0,
        "errors": 0,
    }, outcomes


def test_eavesdropper_reads_the_secret_only_in_the_baseline(lab: dict[str, Any]) -> None:
    e = _attack(lab, "eavesdrop")
    assert e["baseline_compromised"] and e["baseline"]["evidence"]["marker_hits"] >= 64
    ev = e["trustmig"]["evidence"]
    assert ev["marker_hits"] == 0 and ev["bytes_seen"] > 64 << 20 and ev["migration"] == "completed"
    _protected_guest(e, "host-b")


def test_rewritten_memory_arrives_in_the_baseline_guest_only(lab: dict[str, Any]) -> None:
    e = _attack(lab, "memory-rewrite")
    chk = e["baseline"]["evidence"]["destination_check"]
    assert e["baseline"]["evidence"]["rewritten"] > 0 and chk["marker_ok"] < chk["marker_total"]
    ev = e["trustmig"]["evidence"]
    assert ev["bytes_tampered"] > 0 and "authentication failed" in ev["error"]
    _protected_guest(e, "host-a")


def test_patched_sshd_takes_a_wrong_password_only_after_the_baseline_migration(
    lab: dict[str, Any],
) -> None:
    e = _attack(lab, "sshd-rewrite")
    ev = e["baseline"]["evidence"]
    assert ev["patched_in_flight"] >= 1 and ev["migration"] == "completed"
    assert ev["wrong_password_before"] is False and ev["wrong_password_after"] is True
    tv = e["trustmig"]["evidence"]
    assert tv["wrong_password_before"] is False
    assert tv["wrong_password_after"] == {"host-a": False, "host-b": False}
    assert tv["bytes_tampered"] > 0 and "authentication failed" in tv["error"]
    assert tv["key_login_source"] is True
    _protected_guest(e, "host-a")


def test_a_disk_in_flight_is_read_and_rewritten_only_in_the_baseline(
    lab: dict[str, Any],
) -> None:
    e = _attack(lab, "disk-stream")
    ev = e["baseline"]["evidence"]
    assert ev["marker_hits"] >= 64 and ev["rewritten"] >= 64
    assert ev["destination_forged"] >= 64 and ev["destination_markers"] == 0
    tv = e["trustmig"]["evidence"]
    assert tv["marker_hits"] == 0 and tv["bytes_seen"] > 32 << 20
    assert tv["read_copy"] == "completed"
    assert tv["bytes_tampered"] > 0 and "authentication failed" in tv["error"]
    assert tv["source_disk_unchanged"] is True and tv["left_on_destination"] == 0
    _protected_guest(e, "host-a")


def test_replayed_stream_resurrects_a_stale_copy_only_in_the_baseline(lab: dict[str, Any]) -> None:
    e = _attack(lab, "replay")
    ev = e["baseline"]["evidence"]
    assert e["baseline"]["guest"]["running_copies"] == 2
    assert ev["replayed_heartbeat"] < ev["live_heartbeat"]  # the copy went back in time
    tv = e["trustmig"]["evidence"]
    assert tv["new_incoming_migrations"] == 0 and tv["bytes_replayed"] > 0
    assert "replay" in tv["refusal"] or "no migration" in tv["refusal"], tv
    _protected_guest(e, "host-b")


def test_unauthorized_requests_are_obeyed_only_by_the_baseline(lab: dict[str, Any]) -> None:
    e = _attack(lab, "unauthorized")
    ev = e["baseline"]["evidence"]
    assert ev["attacker_copy"]["running_copies"] == 1
    assert ev["migrate_in_from_unknown_host"] == "running"
    tv = e["trustmig"]["evidence"]
    assert all(tv["attempts"].values()), tv["attempts"]  # every attempt got an error line
    assert tv["attempts"]["unprivileged user migrate-out"].startswith("migrate denied: mallory")
    assert tv["audit_denials_of_mallory"] >= 1 and tv["audit_chain_ok"] is True
    _protected_guest(e, "host-a")


def test_control_plane_trespass_is_obeyed_only_by_the_baseline(lab: dict[str, Any]) -> None:
    e = _attack(lab, "control-plane")
    assert e["baseline"]["evidence"]["attempts"]["cross-tenant stop"] == (
        "obeyed: the guest was paused"
    )
    tv = e["trustmig"]["evidence"]
    a = tv["attempts"]
    assert all(a.values()), a  # every attempt got an error line
    assert "belongs to another tenant" in a["cross-tenant stop"]
    assert "belongs to another tenant" in a["cross-tenant migrate"]
    assert a["cross-tenant list"] == "not listed"
    assert "policy-sign on control-plane needs its owner" in a["ownership hijack"]
    assert "rule policy.serial" in a["policy rollback"]
    assert "rule destinations.countries" in a["migrate under the rolled-back policy"]
    assert "host host-s is not a peer" in a["stranger host prepare"]
    assert a["revoked user's open connection"]
    denied = set(tv["audited_denials"])
    assert {"eve:tenant", "oscar:role.policy-sign", "alice:policy.serial"} <= denied, denied
    _protected_guest(e, "host-a")


def test_rogue_destination_receives_memory_only_from_the_baseline(lab: dict[str, Any]) -> None:
    e = _attack(lab, "rogue-destination")
    assert e["baseline"]["evidence"]["bytes_received"] > 64 << 20
    tv = e["trustmig"]["evidence"]
    assert tv["bytes_received"] < 64 * 1024 and "qemu-binary" in tv["error"]
    _protected_guest(e, "host-a")


def test_lying_host_attracts_the_vm_only_in_the_baseline(lab: dict[str, Any]) -> None:
    e = _attack(lab, "false-resources")
    assert e["baseline"]["evidence"]["chosen"] == "host-l"
    tv = e["trustmig"]["evidence"]
    assert "claim_exceeds_attested" in tv["error"] and tv["quarantined"]
    assert "is quarantined" in tv["second_attempt"] and tv["cleared_by"] == "sam"
    _protected_guest(e, "host-a")


def test_lying_host_attracts_the_balancer_only_in_the_baseline(lab: dict[str, Any]) -> None:
    e = _attack(lab, "false-resources-balancer")
    assert [m["destination"] for m in e["baseline"]["evidence"]["plan"]["moves"]] == ["host-l"]
    assert e["baseline"]["guest"]["where"] == "host-l"
    tv = e["trustmig"]["evidence"]
    verdicts = {h["host"]: (h["accept"], h["rule"]) for h in tv["hosts"]}
    assert verdicts == {"host-b": (True, "report_ok"),
                        "host-l": (False, "report_exceeds_attested"),
                        "host-r": (False, "report_unattested")}  # fmt: skip
    assert [m["destination"] for m in tv["plan"]["moves"]] == ["host-b"]
    assert [o["status"] for o in tv["outcomes"]] == ["completed"]
    assert tv["cleared_by"] == "sam"
    _protected_guest(e, "host-b")


def test_flood_stops_only_the_baseline_migration(lab: dict[str, Any]) -> None:
    e = _attack(lab, "flood")
    assert e["baseline"]["evidence"]["flooded_mbps"] is None  # the migration did not complete
    tv = e["trustmig"]["evidence"]
    assert tv["flood"]["attempted"] > 500 and tv["flooded_mbps"], e["trustmig"]
    rss = tv["agent_rss_kib"]
    assert rss["max"] - rss["first"] < 64 * 1024
    _protected_guest(e, "host-b")


def test_malformed_input_corrupts_or_breaks_only_the_baseline(lab: dict[str, Any]) -> None:
    e = _attack(lab, "malformed-stream")
    results = [c["result"] for c in e["baseline"]["evidence"]["cases"].values()]
    assert {"silently corrupted", "crashed", "hung"} & set(results), results
    tv = e["trustmig"]["evidence"]
    assert tv["agent_alive"] and tv["agent_responsive"] and tv["new_incoming"] == 0
    assert tv["outcomes"].get("hung", 0) == 0 and tv["rss_growth_mib"] < 64
    assert e["trustmig_compromised"] is False


def test_cut_stream_loses_the_vm_only_in_the_baseline(lab: dict[str, Any]) -> None:
    e = _attack(lab, "connection-abort")
    # the baseline's post-copy guest is lost: no copy, or one QEMU calls running that no
    # longer beats or answers (it waits forever for pages the cut stream never brings)
    lost = e["baseline"]["evidence"]["post-copy"]["guest"]
    assert lost["running_copies"] == 0 or (
        lost["heartbeat_continued"] is False and lost["memory_intact"] is not True
    ), lost
    tv = e["trustmig"]["evidence"]
    pre, post = tv["pre-copy"], tv["post-copy"]
    assert pre["guest"]["running_copies"] == 1 and pre["guest"]["where"] == "host-a"
    assert post["guest"]["running_copies"] == 1 and post["guest"]["where"] == "host-b"
    assert post["stream_recoveries"] and post["migration"] == "completed"
    for case in (pre, post):
        assert case["cut"] and case["guest"]["memory_intact"] is True
    assert e["trustmig_compromised"] is False


def test_report_renders_the_measured_results(lab: dict[str, Any], tmp_path: Path) -> None:
    html, md = write_reports(lab, tmp_path / "lab-report.html")
    text = html.read_text()
    x805 = text[text.index('id="x805-matrix"') :]
    x805 = x805[: x805.index("</table>")]
    assert x805.count('data-status="') == 72 and 'id="chart"' in text
    assert all(f'data-attack="{a["name"]}"' in text for a in lab["attacks"])
    assert "connection-abort" in md.read_text()


def test_an_attackers_vm_lands_next_to_the_victim_only_in_the_baseline(
    lab: dict[str, Any],
) -> None:
    e = _attack(lab, "co-residency")
    assert e["baseline"]["evidence"]["attacker_vm_on"] == "host-b"
    ev = e["trustmig"]["evidence"]
    assert "co_residency.resident_neighbours" in ev["error"] and not ev["victim_named"]
    assert ev["victim_still_on"] == "host-b"
    _protected_guest(e, "host-a")


def test_a_neighbour_reads_the_victims_port_only_on_the_shared_bridge(
    lab: dict[str, Any],
) -> None:
    e = _attack(lab, "inter-vm")
    assert e["baseline"]["evidence"]["bytes_received"] == 1024
    ev = e["trustmig"]["evidence"]
    assert e["trustmig_compromised"] is False
    assert ev["bytes_received"] == 0 and ev["probe"] in ("timeout", "unreachable", "refused")
    assert ev["same_tenant_bytes"] == 1024  # the service was there to be found
