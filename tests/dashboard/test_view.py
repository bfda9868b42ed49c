"""The dashboard's view model and pages from agents' answers (pure; the browser test in
tests/integration/test_observability_vm.py runs them against a live cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trustmig.dashboard import (
    ClusterReader,
    Dashboard,
    DashboardError,
    HostRaw,
    cluster_view,
    require_loopback,
)
from trustmig.dashboard.app import load_lab


def _host(name: str, **answers: Any) -> HostRaw:
    return HostRaw(name=name, address=f"127.0.0.1:{len(name)}", reachable=True, answers=answers)


def _cluster() -> dict[str, HostRaw]:
    a = _host("host-a",
              status={"vms": [{"name": "vm1", "state": "running", "tenant": "acme",
                               "memory_mib": 256, "migration": "m1"}],
                      "attestation": {"last_results": {
                          "host-b": {"ok": True, "at": 10.0, "summary": "verified pcr_digest=ab"},
                          "host-l": {"ok": False, "at": 11.0, "summary": "not approved"}}}},
              migrations={"migrations": [
                  {"migration_id": "m1", "vm": "vm1", "state": "transferring", "role": "source",
                   "peer": "host-b", "mode": "precopy", "channel": "secure",
                   "progress": {"total": 256 * 2**20, "remaining": 64 * 2**20,
                                "transferred": 200 * 2**20, "dirty_rate_pps": 512, "rounds": 2,
                                "expected_downtime_ms": 30}},
                  {"migration_id": "m0", "vm": "vm0", "state": "completed", "role": "source",
                   "peer": "host-b", "updated_at": 5.0}]},
              quarantine={"quarantined": {"host-l": {"reason": "report_exceeds_attested"}}},
              guard={"guard": {"counters": {"accept": 9, "rate": 3}}, "admission": {}})  # fmt: skip
    b = _host("host-b", status={"vms": []})
    return {"a": a, "b": b, "l": HostRaw(name="host-l", address="x", error="refused")}


def test_progress_attestation_and_quarantine_as_the_page_shows_them() -> None:
    v = cluster_view(_cluster())
    (live,) = v["live"]
    assert live["ram"]["percent"] == 75.0 and live["ram"]["dirty_mibps"] == 2.0
    assert (live["source"], live["destination"]) == ("host-a", "host-b")
    assert [m["vm"] for m in v["history"]] == ["vm0"]
    hosts = {h["name"]: h for h in v["hosts"]}
    assert hosts["host-b"]["attestation"]["state"] == "verified"
    assert hosts["host-l"]["attestation"]["state"] == "refused"
    assert hosts["host-a"]["attestation"]["state"] == "unknown"  # its own word does not count
    assert hosts["host-l"]["quarantined_by"] == [
        {"by": "host-a", "reason": "report_exceeds_attested"}
    ]
    assert {g["host"]: g["refusals"] for g in v["guard"]}["host-a"] == {"rate": 3}


def _dashboard(tmp_path: Path, **kw: Any) -> Dashboard:
    async def dial(address: str) -> Any:
        raise OSError("no agents in a unit test")

    reader = ClusterReader(dial, [])
    reader.hosts = _cluster()
    return Dashboard(reader, user="cleo", **kw)


def test_pages_render_and_escape_what_agents_say(tmp_path: Path) -> None:
    d = _dashboard(tmp_path, allow_actions=True)
    d.reader.hosts["l"].error = "<script>alert(1)</script>"
    html = d.env.get_template("page.html").render(**d._context())
    assert 'data-host="host-l" data-quarantined="yes"' in html
    assert 'data-ram-percent="75.0"' in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    assert f'value="{d.csrf}"' in html  # actions carry the CSRF token
    ro = (
        _dashboard(tmp_path).env.get_template("page.html").render(**_dashboard(tmp_path)._context())
    )
    assert "/actions/" not in ro  # read-only by default


def test_it_binds_loopback_only() -> None:
    require_loopback("127.0.0.1")
    require_loopback("::1")
    for public in ("0.0.0.0", "10.1.2.3", "example.org"):
        with pytest.raises(DashboardError):
            require_loopback(public)


def test_a_lab_report_is_summarised_and_a_broken_one_shown(tmp_path: Path) -> None:
    p = tmp_path / "lab.json"
    p.write_text('{"attacks": [{"name": "replay", "baseline": {"compromised": true},'
                 ' "trustmig": {"compromised": false}}]}')  # fmt: skip
    lab = load_lab(p)
    assert lab is not None and lab["attacks"] == [
        {"name": "replay", "baseline": "compromised", "trustmig": "blocked"}
    ]
    p.write_text("{")
    broken = load_lab(p)
    assert broken is not None and broken["summary"]["errors"] == 1


def test_another_name_for_loopback_gets_nothing(tmp_path: Path) -> None:
    """DNS rebinding: a page of another origin resolving to 127.0.0.1 is refused."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    d = _dashboard(tmp_path, allow_actions=True)
    d.origins = frozenset({"127.0.0.1:8470", "localhost:8470"})

    async def go() -> tuple[int, int, int]:
        async with TestClient(TestServer(d.app())) as c:
            ok = await c.get("/api/state", headers={"Host": "127.0.0.1:8470"})
            rebound = await c.get("/api/state", headers={"Host": "evil.example:8470"})
            forged = await c.post("/actions/clear", data={"csrf": d.csrf, "host": "host-l"},
                                  headers={"Host": "127.0.0.1:8470",
                                           "Origin": "http://evil.example:8470"})  # fmt: skip
            return ok.status, rebound.status, forged.status

    assert asyncio.run(go()) == (200, 421, 403)
