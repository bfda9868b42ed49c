"""The agent's metrics as a fold over its audit events plus levels read at scrape time; the
exposition parses with prometheus_client's own parser."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trustmig.metrics import AgentMetrics, StateSample

MID = "0b3f6a59-5d0e-4f57-9a59-7e3f1d2c9a10"


def _samples(m: AgentMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(m.registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _migration(m: AgentMetrics, outcome: str = "completed", **done: Any) -> None:
    m.observe_audit(
        "migrate.request",
        {
            "migration_id": MID,
            "data": {"destination": "host-b", "options": {"channel": "secure", "mode": "precopy"}},
        },
    )
    m.observe_audit(
        "policy.decision",
        {
            "migration_id": MID,
            "outcome": "allow",
            "data": {"direction": "migrate-out", "rule": "vm-policy.allow"},
        },
    )
    if outcome == "completed":
        m.observe_audit(
            "migration.complete",
            {
                "migration_id": MID,
                "data": {
                    "mode": "precopy",
                    "channel": "secure",
                    "total_ms": 1500.0,
                    "downtime_ms": 40.0,
                    "bytes_transferred": 300_000_000,
                    "throughput_mbps": 200.0,
                    "handshake_ms": 12.0,
                    **done,
                },
            },
        )
    m.observe_audit(
        "migration.phase",
        {"migration_id": MID, "outcome": outcome, "data": {"role": "source", "from": "switching"}},
    )


def test_a_completed_migration_moves_exactly_its_counters() -> None:
    m = AgentMetrics("host-a")
    _migration(m)
    s = _samples(m)
    key = (("channel", "secure"), ("mode", "precopy"), ("outcome", "completed"), ("role", "source"))
    assert s[("trustmig_migrations_total", key)] == 1
    assert s[("trustmig_migration_transferred_bytes_total", (("channel", "secure"),))] == 3e8
    assert (
        s[("trustmig_migration_downtime_seconds_sum", (("channel", "secure"), ("mode", "precopy")))]
        == 0.04
    )
    assert (
        s[("trustmig_migration_throughput_bytes_per_second_count", (("channel", "secure"),))] == 1
    )
    assert s[("trustmig_channel_handshake_seconds_count", ())] == 1
    assert (
        s[
            (
                "trustmig_policy_decisions_total",
                (("direction", "migrate-out"), ("outcome", "allow"), ("rule", "vm-policy.allow")),
            )
        ]
        == 1
    )
    assert s[("trustmig_agent_info", (("host", "host-a"),))] == 1


def test_non_terminal_phases_and_malformed_events_count_nothing() -> None:
    m = AgentMetrics("host-a")
    m.observe_audit("migration.phase", {"outcome": "transferring", "data": {"role": "source"}})
    m.observe_audit("migration.complete", {"data": "not a mapping"})
    m.observe_audit("policy.decision", {"data": None})
    assert not any(name == "trustmig_migrations_total" for name, _ in _samples(m))


def test_a_destination_labels_its_migrations_from_the_migrate_in_decision() -> None:
    m = AgentMetrics("host-b")
    m.observe_audit(
        "policy.decision",
        {
            "migration_id": MID,
            "outcome": "allow",
            "data": {
                "direction": "migrate-in",
                "rule": "host-policy.allow",
                "options": {"channel": "qemu-tls", "mode": "postcopy"},
            },
        },
    )
    m.observe_audit(
        "migration.phase",
        {"migration_id": MID, "outcome": "committed", "data": {"role": "destination"}},
    )
    key = (
        ("channel", "qemu-tls"),
        ("mode", "postcopy"),
        ("outcome", "committed"),
        ("role", "destination"),
    )
    assert _samples(m)[("trustmig_migrations_total", key)] == 1


def test_levels_are_read_at_scrape_time() -> None:
    level = {"n": 0}

    def sample() -> StateSample:
        return StateSample(
            guard_rules={"accept": 5, "rate": level["n"], "proof_deadline": 2},
            admission_running={"in": 1, "out": 0}, admission_queued={"in": 0, "out": 3},
            quarantined_hosts=1, audit_events=42, audit_last_verified=1.7e9, audit_last_ok=True,
            vms_by_state={"running": 2}, migrations_in_progress={"source": 1, "destination": 0},
        )  # fmt: skip

    m = AgentMetrics("host-a", sample)
    level["n"] = 7
    s = _samples(m)
    assert s[("trustmig_guard_refusals_total", (("rule", "rate"),))] == 7
    assert s[("trustmig_guard_refusals_total", (("rule", "proof_deadline"),))] == 2
    assert s[("trustmig_guard_admissions_total", (("rule", "accept"),))] == 5
    assert ("trustmig_guard_refusals_total", (("rule", "accept"),)) not in s
    assert s[("trustmig_admission_queued", (("direction", "out"),))] == 3
    assert s[("trustmig_quarantined_hosts", ())] == 1
    assert s[("trustmig_audit_chain_events", ())] == 42
    assert s[("trustmig_audit_last_verification_ok", ())] == 1
    assert s[("trustmig_vms", (("state", "running"),))] == 2
    assert s[("trustmig_migrations_in_progress", (("role", "source"),))] == 1


def test_attestation_verdicts_and_the_felt_pause() -> None:
    m = AgentMetrics("host-b")
    m.attested(True, 0.02)
    m.attested(False, 0.01)
    m.guest_pause("secure", "precopy", 0.12)
    s = _samples(m)
    assert s[("trustmig_attestation_verdicts_total", (("verdict", "verified"),))] == 1
    assert s[("trustmig_attestation_verdicts_total", (("verdict", "refused"),))] == 1
    assert s[("trustmig_attestation_duration_seconds_count", ())] == 2
    assert (
        s[
            (
                "trustmig_migration_guest_pause_seconds_sum",
                (("channel", "secure"), ("mode", "precopy")),
            )
        ]
        == 0.12
    )


def test_the_grafana_dashboard_queries_only_metrics_the_agents_export() -> None:
    import json
    import re
    from pathlib import Path

    doc = json.loads((Path(__file__).parents[2] / "docs/grafana/trustmig.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\btrustmig_[a-z_]+", e)}
    full = StateSample(
        guard_rules={"rate": 1},
        admission_running={"in": 0},
        admission_queued={"in": 0},
        audit_last_verified=1.0,
        audit_last_ok=True,
        vms_by_state={"running": 1},
        migrations_in_progress={"source": 0},
    )
    m = AgentMetrics("host-a", lambda: full)
    _migration(m)
    m.attested(True, 0.1)
    m.guest_pause("secure", "precopy", 0.1)
    m.observe_audit("guard.quarantine", {"outcome": "quarantined"})
    exported = {name for name, _ in _samples(m)}
    assert used and used <= exported, sorted(used - exported)
    assert len(doc["panels"]) >= 12
