"""`trustmig cluster up|status|down` with real agent processes, driven like an administrator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .helpers import pid_alive

pytestmark = pytest.mark.tpm


def tm(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-m", "trustmig.cli.main", *args, "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def test_cluster_up_is_idempotent_and_down_leaves_nothing(tmp_path: Path, guest_image: Any) -> None:
    d = tmp_path / "c"
    try:
        up = tm("cluster", "up", "--hosts", "3", "--state-dir", str(d))
        assert [h["name"] for h in up["hosts"]] == ["host-a", "host-b", "host-c"]
        assert all(h["pid"] and h["control"] and Path(h["state_dir"]).is_dir() for h in up["hosts"])
        assert Path(up["credentials"], "user.pem").exists()
        assert sorted(up["started"]) == ["host-a", "host-b", "host-c"]
        again = tm("cluster", "up", "--state-dir", str(d))
        assert again["started"] == []
        assert [h["pid"] for h in again["hosts"]] == [h["pid"] for h in up["hosts"]]
        b = up["hosts"][1]
        os.kill(b["pid"], signal.SIGKILL)
        third = tm("cluster", "up", "--state-dir", str(d))
        assert third["started"] == ["host-b"]
        env = {"TRUSTMIG_AGENT": b["control"], "TRUSTMIG_CREDENTIALS": up["credentials"]}
        listed = tm("vm", "list", env=env)
        assert listed["host"] == "host-b" and listed["vms"] == []
        status = tm("cluster", "status", "--state-dir", str(d))
        assert all(h["running"] and h["reachable"] for h in status["hosts"])
        pids = [h["pid"] for h in status["hosts"]]
    finally:
        down = tm("cluster", "down", "--state-dir", str(d))
    assert down["stopped_agents"] == ["host-a", "host-b", "host-c"]
    assert not any(pid_alive(p) for p in pids)
    after = tm("cluster", "status", "--state-dir", str(d))
    assert not any(h["running"] for h in after["hosts"])


def test_cluster_commands_on_a_missing_directory_say_what_to_do(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "trustmig.cli.main", "cluster", "status", "--state-dir",
         str(tmp_path / "none")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1
    assert "no cluster in" in res.stderr and "trustmig cluster up" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.netns
def test_a_namespaced_cluster_is_reached_through_exec_and_leaves_no_namespace(
    tmp_path: Path, guest_image: Any
) -> None:
    from trustmig.netns.topology import existing_namespaces

    d = tmp_path / "n"
    try:
        up = tm("cluster", "up", "--netns", "--state-dir", str(d))
        names = up["netns"]["namespaces"]
        assert set(names) <= existing_namespaces()
        assert [h["control"] for h in up["hosts"]] == ["10.77.1.11:7100", "10.77.1.12:7100"]
        res = subprocess.run(
            [sys.executable, "-m", "trustmig.cli.main", "cluster", "exec", "--state-dir", str(d),
             "--host", "host-b", "--", "trustmig", "vm", "list", "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["host"] == "host-b"
        st = tm("cluster", "status", "--state-dir", str(d))
        assert all(h["reachable"] for h in st["hosts"]), st
    finally:
        subprocess.run([sys.executable, "-m", "trustmig.cli.main", "cluster", "down",
                        "--state-dir", str(d)], capture_output=True, timeout=120)  # fmt: skip
    assert not set(names) & existing_namespaces()
