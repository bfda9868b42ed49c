"""An audit trail cannot silently vanish: peers witness its head, and an agent refuses to start
on a trail that is shorter or different until an administrator acknowledges the loss."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from trustmig.agent.client import ControlError
from trustmig.agent.journal import Journal
from trustmig.agent.local_cluster import LocalCluster

from .helpers import arun, audit_events

pytestmark = pytest.mark.vm
FAST = "[agent]\naudit_witness_interval_s = 0.3\n"


def _witnessed(cluster: LocalCluster, by: str, of: str) -> int:
    j = Journal(cluster.hosts[by].dir / "journal.db")
    try:
        held = j.witness(of)
        return held[0] if held else 0
    finally:
        j.close()


def _wipe(path: Path, how: str) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(b"")


def test_an_emptied_or_deleted_trail_is_refused_until_the_loss_is_acknowledged(
    make_cluster,
) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(extra_config={"host-a": FAST, "host-b": FAST})
    cluster.add_user("sam", ["security-admin", "auditor"])

    async def make_events() -> None:
        c = await cluster.client("host-a", "alice")
        try:
            for _ in range(5):  # denied calls leave audit records
                with pytest.raises(ControlError):
                    await c.call("vm.stop", {"name": "nope"})
                with pytest.raises(ControlError):
                    await c.call("audit.export")
        finally:
            await c.close()

    arun(make_events())
    deadline = time.monotonic() + 20
    while _witnessed(cluster, "host-b", "host-a") < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    seen = _witnessed(cluster, "host-b", "host-a")
    assert seen >= 5
    audit_db = cluster.hosts["host-a"].dir / "audit.db"
    for how in ("empty", "delete"):
        cluster.kill_agent("host-a", signal.SIGKILL)
        _wipe(audit_db, how)
        with pytest.raises(RuntimeError):
            cluster.start_agent("host-a", timeout=30)
        tail = cluster.log_tail("host-a", 5)
        assert "audit trail of host-a holds" in tail and "witnessed" in tail, tail
        assert "--accept-audit-loss" in tail, tail

    cluster.start_agent("host-a", timeout=30, extra_args=("--accept-audit-loss",))
    acknowledged = audit_events(cluster, "host-a", "audit.loss_acknowledged")
    assert acknowledged and acknowledged[0].data["verdict"] == "truncated"
    resets = audit_events(cluster, "host-b", "audit.witness_reset")
    assert resets and resets[-1].data["host"] == "host-a" and resets[-1].data["from"] >= seen

    async def verify() -> dict[str, Any]:
        c = await cluster.client("host-a", "sam")
        try:
            return await c.call("audit.verify")
        finally:
            await c.close()

    rep = arun(verify())
    assert rep["ok"] is True and rep["anchor"]["code"] == "ok", rep["anchor"]
    assert {w["by"] for w in rep["anchor"]["witnesses"]} >= {"host-b", "local journal"}


def test_a_typo_or_a_busy_port_is_one_line(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(hosts=("host-a",), defer_start=True)
    hh = cluster.hosts["host-a"]
    text = hh.config_path.read_text()
    hh.config_path.write_text(text + "\n[guard]\nmax_conn_per_ipp = 3\n")
    with pytest.raises(RuntimeError):
        cluster.start_agent("host-a", timeout=30)
    tail = cluster.log_tail("host-a", 3)
    assert "unknown key 'max_conn_per_ipp' under [guard]; known: allowed_networks" in tail, tail
    assert "Traceback" not in cluster.log_tail("host-a", 40)

    hh.config_path.write_text(text)
    host, port = hh.control.rsplit(":", 1)
    with socket.create_server((host, int(port))), pytest.raises(RuntimeError):
        cluster.start_agent("host-a", timeout=30)
    tail = cluster.log_tail("host-a", 3)
    assert f"control listener {hh.control}: Address already in use" in tail, tail
