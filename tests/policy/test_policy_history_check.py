"""Rate-limit history persistence and the `policy check` summary."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from policy_helpers import HOST_TOML, MONDAY_NIGHT, VM_TOML, VM_YAML, MiniPki

from trustmig.policy import MigrationHistory, PolicyError, check_policy_file, sign_policy


def test_history_counts_only_the_last_hour() -> None:
    h = MigrationHistory()
    h.record("web-1", MONDAY_NIGHT - dt.timedelta(minutes=61))
    h.record("web-1", MONDAY_NIGHT - dt.timedelta(minutes=59))
    h.record("web-1", MONDAY_NIGHT)
    assert h.count_last_hour("web-1", MONDAY_NIGHT) == 2
    assert h.count_last_hour("web-1", MONDAY_NIGHT - dt.timedelta(minutes=30)) == 1
    assert h.count_last_hour("db-1", MONDAY_NIGHT) == 0


def test_history_persists_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "state" / "history.json"
    h = MigrationHistory(path)
    h.record("web-1", MONDAY_NIGHT - dt.timedelta(minutes=5))
    h.record("web-1", MONDAY_NIGHT)
    reloaded = MigrationHistory(path)
    assert reloaded.count_last_hour("web-1", MONDAY_NIGHT) == 2
    assert [p.name for p in path.parent.iterdir()] == ["history.json"]  # no temp files left


def test_history_rejects_naive_times_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="timezone-aware"):
        MigrationHistory().record("web-1", dt.datetime(2024, 6, 3))
    bad = tmp_path / "h.json"
    bad.write_text('{"web-1": ["yesterday"]}')
    with pytest.raises(PolicyError, match="migration history is unreadable"):
        MigrationHistory(bad)


def test_check_vm_and_host_policies(tmp_path: Path) -> None:
    (tmp_path / "web-1.toml").write_text(VM_TOML)
    (tmp_path / "web-1.yaml").write_text(VM_YAML)
    (tmp_path / "hostB.toml").write_text(HOST_TOML)
    summary = check_policy_file(tmp_path / "web-1.toml")
    assert "VM policy for web-1 (tenant acme, owner alice)" in summary
    assert "users [alice] or roles [operator]" in summary
    assert "post-copy refused" in summary and "at most 4 per hour" in summary
    assert "countries [DE, FR]" in summary and "security level >= 2" in summary
    assert "VM policy for web-1" in check_policy_file(tmp_path / "web-1.yaml")
    host = check_policy_file(tmp_path / "hostB.toml")
    assert "host policy for hostB (country DE, zone eu-1, security level 3)" in host
    assert "from [hostA, hostC] of tenants [acme]" in host


def test_check_reports_line_of_error(tmp_path: Path) -> None:
    bad = tmp_path / "hostB.toml"
    bad.write_text(HOST_TOML.replace('country = "DE"', 'country = "Germany"'))
    with pytest.raises(PolicyError, match=rf"^{bad} line 4: labels.country: expected an ISO"):
        check_policy_file(bad)


def test_check_signed_policy(tmp_path: Path, pki: MiniPki) -> None:
    alice = pki.issue("alice", ("owner",))
    path = tmp_path / "web-1.signed.json"
    path.write_text(sign_policy(VM_TOML, "toml", "alice", alice.cert_der, alice.key).to_json())
    assert "signature not checked" in check_policy_file(path)
    assert "signed by alice" in check_policy_file(path, pki.verifier())
