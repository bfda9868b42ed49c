"""A host's first hour from the CLI: host init writes what loads, enroll refuses a taken name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from trustmig.config import load_config
from trustmig.pki.authority import ClusterCA


def cli(*args: str) -> tuple[int, dict]:
    p = subprocess.run([sys.executable, "-m", "trustmig.cli.main", *args, "--json"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    return p.returncode, json.loads(p.stdout or "{}")


def test_host_init_writes_a_complete_config_that_loads(tmp_path: Path) -> None:
    code, out = cli("host", "init", "host-z", "--dir", str(tmp_path), "--control", "10.0.0.5:7000")
    assert code == 0, out
    cfg = load_config(tmp_path / "host.toml")
    assert cfg.name == "host-z" and cfg.control.listen == "10.0.0.5:7000"
    assert cfg.admission["max_per_vm_per_hour"] == 4 and cfg.attestation.enabled
    assert (tmp_path / "policies" / "host.toml").exists()
    assert out["next"][0].startswith("trustmig host enroll host-z --ca-dir")
    code, out = cli("host", "init", "host-z", "--dir", str(tmp_path))
    assert code == 1 and "exists: pass --force" in out["error"]


def test_enrolling_a_taken_name_is_refused_or_replaces_and_revokes(tmp_path: Path) -> None:
    ca = ClusterCA.init(tmp_path / "ca")
    base = ("host", "enroll", "host-z", "--ca-dir", str(ca.ca_dir))
    assert cli(*base, "--out", str(tmp_path / "one"))[0] == 0
    code, out = cli(*base, "--out", str(tmp_path / "two"))
    assert code == 1 and out["error"].startswith("host host-z is already enrolled (serial ")
    assert not (tmp_path / "two").exists()
    code, out = cli(*base, "--out", str(tmp_path / "two"), "--replace")
    assert code == 0 and len(out["revoked_serials"]) == 1
    live = [r for r in ca.issued() if r["name"] == "host-z" and not r["revoked"]]
    assert len(live) == 1
