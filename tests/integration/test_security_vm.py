"""The secure channel, policies, audit trail and receipts, against real migrations."""

from __future__ import annotations

import base64
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from trustmig.agent.governance import audit_url
from trustmig.agent.local_cluster import free_port
from trustmig.audit import AuditLog, verify_receipt
from trustmig.hypervisor.spec import DEFAULT_SECRET
from trustmig.lab.proxy import BitFlipper, Cutter, MitmProxy, Rewriter, Sniffer

from .helpers import arun, assert_absent, assert_running_and_beating, pid_alive, spec, start_vm

pytestmark = pytest.mark.vm
SLOW = {"mode": "precopy", "max_bandwidth_mibps": 48}


def _via_proxy(make_cluster, tap, **policy):  # type: ignore[no-untyped-def]
    """Migrate vm1 host-a -> host-b through a MITM proxy; returns (result, error, cluster)."""
    port = free_port()
    with MitmProxy(("127.0.0.1", port), tap) as proxy:
        cluster = make_cluster(
            data_listen={"host-b": f"127.0.0.1:{port}"}, data_advertise={"host-b": proxy.hostport}
        )

        async def go():  # type: ignore[no-untyped-def]
            src = await cluster.client("host-a", "alice")
            dst = await cluster.client("host-b", "alice")
            try:
                await start_vm(src, spec(memory=256, workload=64, rate=4), cluster, **policy)
                try:
                    res = await src.call(
                        "migrate", {"vm": "vm1", "to": "host-b", "options": SLOW}, timeout=300
                    )
                    err = None
                except Exception as e:
                    res, err = None, str(e)
                status_b = await dst.call("host.status")
                if err:
                    await assert_running_and_beating(src, "vm1")
                    check = await src.call("vm.check", {"name": "vm1"})
                    assert check["bad_pages"] == 0 and check["marker_ok"] == check["marker_total"]
                    await assert_absent(dst, "vm1")
                return res, err, status_b
            finally:
                await src.close()
                await dst.close()

        res, err, status_b = arun(go())
    for inc in status_b.get("incoming", []):
        if err:
            assert not pid_alive(inc.get("pid")), "destination QEMU survived a failed migration"
    return res, err, cluster, status_b


def test_bit_flip_in_stream_aborts_with_source_running(make_cluster) -> None:  # type: ignore[no-untyped-def]
    flip = BitFlipper(at_offset=8 * 1024 * 1024)
    res, err, _, _ = _via_proxy(make_cluster, flip)
    assert flip.flipped
    assert res is None and err
    assert "record" in err and "authentication" in err, err


def test_memory_rewrite_in_flight_is_refused(make_cluster) -> None:  # type: ignore[no-untyped-def]
    secret = DEFAULT_SECRET.encode()
    rw = Rewriter(secret, b"X" * len(secret))
    res, err, _, _ = _via_proxy(make_cluster, rw)
    # the marker never crosses the wire in clear, so there is nothing to rewrite
    assert rw.replaced == 0
    assert res is not None and res["status"] == "completed", err


def test_eavesdropper_sees_no_guest_secret(make_cluster) -> None:  # type: ignore[no-untyped-def]
    sniff = Sniffer(DEFAULT_SECRET.encode())
    res, err, _, _ = _via_proxy(make_cluster, sniff)
    assert res is not None, err
    assert sniff.bytes_seen > 64 * 1024 * 1024
    assert sniff.hits == 0


def test_recorded_session_replayed_later_is_refused(make_cluster) -> None:  # type: ignore[no-untyped-def]
    sniff = Sniffer(b"\x00never", record_limit=4 * 1024 * 1024)
    res, err, cluster, _ = _via_proxy(make_cluster, sniff)
    assert res is not None, err
    recording = bytes(sniff.recordings[0])
    assert len(recording) > 1024 * 1024
    target = cluster.hosts["host-b"].data_listen
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(recording[:65536])
        s.settimeout(5)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass

    async def status():  # type: ignore[no-untyped-def]
        c = await cluster.client("host-b", "alice")
        try:
            return await c.call("host.status")
        finally:
            await c.close()

    st = arun(status())
    reasons = [r["reason"] for r in st["refused_data_connections"]]
    assert any("replay" in r or "no migration" in r for r in reasons), reasons
    assert not [v for v in st["vms"] if v["name"] != "vm1"]


# ------------------------------------------------------------------------------ policy + audit
def _audit(state_dir: Path, host: str) -> AuditLog:
    return AuditLog(audit_url(state_dir), host=host, signing_key=None)


def test_user_without_role_is_denied_and_audited(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster()
    cluster.add_user("bob", ["auditor"], tenant="acme")

    async def go():  # type: ignore[no-untyped-def]
        alice = await cluster.client("host-a", "alice")
        bob = await cluster.client("host-a", "bob")
        try:
            await start_vm(alice, spec(), cluster)
            with pytest.raises(Exception) as ei:
                await bob.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}})
            await assert_running_and_beating(alice, "vm1")
            return str(ei.value)
        finally:
            await alice.close()
            await bob.close()

    err = arun(go())
    assert err.startswith("migrate denied: bob has roles [auditor]"), err
    assert "(rule role.migrate)" in err
    log = _audit(cluster.hosts["host-a"].dir, "host-a")
    denials = [e for e in log.events(kind="access.denied") if e.outcome == "denied"]
    assert denials and denials[-1].user == "bob"
    assert denials[-1].data["rule"] == "role.migrate" and denials[-1].data["op"] == "migrate"
    log.close()


def test_destination_outside_allowed_countries_denied_before_connecting(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(labels={"host-b": {"country": "US", "security_level": 3}})

    async def go():  # type: ignore[no-untyped-def]
        a = await cluster.client("host-a", "alice")
        try:
            await start_vm(a, spec(), cluster, countries=["DE", "FR"])
            with pytest.raises(Exception) as ei:
                await a.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}})
            await assert_running_and_beating(a, "vm1")
            return str(ei.value)
        finally:
            await a.close()

    err = arun(go())
    assert "destinations.countries" in err and "US" in err, err
    log_b = _audit(cluster.hosts["host-b"].dir, "host-b")
    assert not [e for e in log_b.events() if e.kind.startswith(("migration.", "policy."))]
    log_b.close()


def test_host_policy_refusing_tenant_denies_migrate_in(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(accept_tenants={"host-b": ["globex"]})

    async def go():  # type: ignore[no-untyped-def]
        a = await cluster.client("host-a", "alice")
        b = await cluster.client("host-b", "alice")
        try:
            await start_vm(a, spec(), cluster)
            with pytest.raises(Exception) as ei:
                await a.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}})
            await assert_running_and_beating(a, "vm1")
            await assert_absent(b, "vm1")
            return str(ei.value)
        finally:
            await a.close()
            await b.close()

    err = arun(go())
    assert "DENY migrate-in" in err and "accept.tenants" in err, err


def test_receipt_signed_by_both_and_audit_tamper_detected(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster()

    async def go():  # type: ignore[no-untyped-def]
        a = await cluster.client("host-a", "alice")
        try:
            await start_vm(a, spec(), cluster)
            return await a.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}})
        finally:
            await a.close()

    res = arun(go())
    cluster.stop()  # flushes and closes both trails
    mid = res["receipt_id"]
    pubs = {
        h: serialization.load_pem_public_key((cluster.hosts[h].dir / "keys/audit.pub").read_bytes())
        for h in ("host-a", "host-b")
    }
    for h, other in (("host-a", "host-b"), ("host-b", "host-a")):
        log = _audit(cluster.hosts[h].dir, h)
        (r,) = log.receipts(mid)
        assert verify_receipt(pubs[h], r["fields"], r["own_sig"])
        assert verify_receipt(pubs[other], r["fields"], r["peer_sig"])
        log.close()
    assert base64.b64decode(res["receipt"]["source_signature"])

    state = cluster.hosts["host-a"].dir
    cli = [sys.executable, "-m", "trustmig.cli.main", "audit", "verify", "--state-dir", str(state)]
    assert subprocess.run(cli, capture_output=True).returncode == 0
    db = sqlite3.connect(state / "audit.db")
    table = next(
        t
        for (t,) in db.execute("select name from sqlite_master where type='table'")
        if "event" in t
    )
    cols = [c[1] for c in db.execute(f"pragma table_info({table})")]
    data_col = "data" if "data" in cols else next(c for c in cols if "data" in c)
    db.execute(f"update {table} set {data_col} = ? where seq = 3", ('{"forged": true}',))
    db.commit()
    db.close()
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode != 0
    assert "seq 3" in r.stdout, r.stdout


def test_postcopy_stream_cut_is_recovered_over_a_new_attested_session(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cut = Cutter(after_bytes=16 * 1024 * 1024)
    port = free_port()
    with MitmProxy(("127.0.0.1", port), cut) as proxy:
        cluster = make_cluster(
            data_listen={"host-b": f"127.0.0.1:{port}"}, data_advertise={"host-b": proxy.hostport}
        )

        async def go():  # type: ignore[no-untyped-def]
            a = await cluster.client("host-a", "alice")
            b = await cluster.client("host-b", "alice")
            try:
                await start_vm(a, spec(memory=256, workload=64, rate=4), cluster)
                res = await a.call(
                    "migrate",
                    {
                        "vm": "vm1",
                        "to": "host-b",
                        "options": {
                            "mode": "postcopy",
                            "postcopy_after_rounds": 1,
                            "max_bandwidth_mibps": 32,
                        },
                    },
                    timeout=300,
                )
                await assert_running_and_beating(b, "vm1")
                await assert_absent(a, "vm1")
                check = await b.call("vm.check", {"name": "vm1"})
                events: list[object] = []
                return res, check, events
            finally:
                await a.close()
                await b.close()

        res, check, _ = arun(go())
    assert cut.cut and proxy.connections >= 2  # the first stream was cut, a second one carried on
    assert res["status"] == "completed" and res["mode"] == "postcopy"
    assert res["stream_recoveries"] and "stream 0" in res["stream_recoveries"][0]
    assert check["bad_pages"] == 0 and check["marker_ok"] == check["marker_total"]
