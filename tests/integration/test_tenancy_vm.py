"""Nobody gets in where they don't belong, on real agents: tenants, ownership, policy serials,
peers, revocation, private files and clear answers to bad input."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import stat
import struct
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from trustmig.agent.client import ControlClient, ControlError
from trustmig.agent.local_cluster import LocalCluster
from trustmig.pki.authority import Credentials
from trustmig.pki.tls import client_context
from trustmig.pki.trust import TrustBundle

from .helpers import arun, assert_absent, assert_running_and_beating, audit_events, pid_alive, spec

pytestmark = pytest.mark.vm
SECRET = "TENANT-ACME-SECRET-0123456789"


async def _denied(c: ControlClient, op: str, params: dict[str, Any]) -> str:
    with pytest.raises(ControlError) as err:
        await c.call(op, params, timeout=60)
    assert err.value.code == "denied", (op, str(err.value))
    assert "\n" not in str(err.value)
    return str(err.value)


async def _host_client(cluster: LocalCluster, host: str, creds: Credentials) -> ControlClient:
    bundle = TrustBundle.load(creds.ca_path, creds.crl_path)
    return await ControlClient.connect(cluster.hosts[host].control, client_context(creds, bundle))


# ------------------------------------------------------------------ tenants and ownership
def test_tenants_owners_and_policy_serials_on_real_agents(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster()
    cluster.add_user("eve", ["operator", "owner"], tenant="evil")
    cluster.add_user("mallory", ["owner"], tenant="acme")
    cluster.add_user("bob", ["owner"], tenant="acme")
    a_dir = cluster.hosts["host-a"].dir

    async def go() -> dict[str, Any]:
        alice = await cluster.client("host-a", "alice")
        eve = await cluster.client("host-a", "eve")
        mallory = await cluster.client("host-a", "mallory")
        seen: dict[str, Any] = {}
        try:
            s = spec(memory=256, workload=32)
            s["workload"]["secret"] = SECRET
            old = cluster.signed_policy("alice", "vm1")
            vm = await alice.call("vm.start", {"spec": s, "policy": old}, timeout=300)
            seen["pid"] = vm["pid"]
            assert vm["tenant"] == "acme" and vm["owner"] == "alice"

            # another tenant sees nothing and may do nothing
            assert (await eve.call("vm.list"))["vms"] == []
            assert (await eve.call("host.status"))["vms"] == []
            for op, params in (
                ("vm.stop", {"name": "vm1"}),
                ("vm.check", {"name": "vm1"}),
                ("vm.heartbeats", {"name": "vm1"}),
                ("migrate", {"vm": "vm1", "to": "host-b", "options": {}}),
                ("policy.show", {"vm": "vm1"}),
                ("vm.transfer", {"name": "vm1", "to": "eve"}),
                ("audit.show", {"vm": "vm1"}),
            ):
                line = await _denied(eve, op, params)
                assert "belongs to another tenant" in line and "alice" not in line, line
            # the same tenant's other owner may neither sign for nor move the VM
            hijack = cluster.signed_policy("mallory", "vm1", owner="mallory")
            seen["hijack"] = await _denied(mallory, "policy.set", {"vm": "vm1", "policy": hijack})
            await _denied(mallory, "migrate", {"vm": "vm1", "to": "host-b", "options": {}})
            # the owner herself cannot move ownership by rewriting the policy
            with pytest.raises(ControlError) as err:
                renamed = cluster.signed_policy("alice", "vm1", owner="mallory")
                await alice.call("policy.set", {"vm": "vm1", "policy": renamed})
            seen["renamed"] = str(err.value)
            await assert_running_and_beating(alice, "vm1")

            # policy versions: a newer policy forbids host-b, the older one cannot come back
            newer = cluster.signed_policy("alice", "vm1", countries=["FR"])
            await alice.call("policy.set", {"vm": "vm1", "policy": newer})
            seen["rollback"] = await _denied(alice, "policy.set", {"vm": "vm1", "policy": old})
            with pytest.raises(ControlError) as err:
                await alice.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}})
            seen["forbidden"] = str(err.value)
            # the owner's own next migration, under a newer policy, goes through
            allowed = cluster.signed_policy("alice", "vm1")
            await alice.call("policy.set", {"vm": "vm1", "policy": allowed})
            res = await alice.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}},
                                   timeout=300)  # fmt: skip
            seen["first"] = res["status"]
        finally:
            for c in (alice, eve, mallory):
                await c.close()
        # on host-b: the VM arrived with its policy; ownership moves by transfer only
        alice_b = await cluster.client("host-b", "alice")
        bob_b = await cluster.client("host-b", "bob")
        try:
            shown = await alice_b.call("policy.show", {"vm": "vm1"})
            seen["serial_b"] = shown["serial"]
            seen["transfer"] = await alice_b.call("vm.transfer", {"name": "vm1", "to": "bob"})
            with pytest.raises(ControlError) as err:
                await alice_b.call("migrate", {"vm": "vm1", "to": "host-a", "options": {}})
            seen["stale_owner"] = str(err.value)
            await bob_b.call("policy.set", {"vm": "vm1", "policy": cluster.signed_policy(
                "bob", "vm1", allowed_users=["bob"])})  # fmt: skip
            back = await alice_b.call("migrate", {"vm": "vm1", "to": "host-a", "options": {}},
                                      timeout=300)  # fmt: skip
            seen["back"] = back["status"]
            await assert_absent(alice_b, "vm1")
        finally:
            await alice_b.close()
            await bob_b.close()
        bob = await cluster.client("host-a", "bob")
        try:
            await assert_running_and_beating(bob, "vm1")
            vms = (await bob.call("vm.list"))["vms"]
            seen["owner_a"] = vms[0]["owner"]
            seen["pid_a"] = vms[0]["pid"]
        finally:
            await bob.close()
        return seen

    seen = arun(go())
    assert "policy-sign on vm1 needs its owner" in seen["hijack"], seen["hijack"]
    assert "names owner 'mallory' but the VM's owner here is 'alice'" in seen["renamed"]
    assert (
        "is not newer than serial" in seen["rollback"] and "rule policy.serial" in seen["rollback"]
    )
    assert seen["forbidden"].startswith("DENY migrate-out vm1 host-a -> host-b by alice: rule "
                                        "destinations.countries"), seen["forbidden"]  # fmt: skip
    assert seen["first"] == "completed" and seen["back"] == "completed"
    assert seen["serial_b"] > 0
    assert seen["transfer"]["from"] == "alice" and seen["transfer"]["to"] == "bob"
    assert "rule policy.signature" in seen["stale_owner"] and "'bob'" in seen["stale_owner"]
    assert seen["owner_a"] == "bob"
    assert pid_alive(seen["pid_a"]) and not pid_alive(seen["pid"])

    denials = audit_events(cluster, "host-a", "access.denied")
    by_user = {(e.user, e.data["op"], e.data["rule"]) for e in denials}
    assert ("eve", "vm.stop", "tenant") in by_user and ("eve", "migrate", "tenant") in by_user
    assert ("mallory", "policy.set", "role.policy-sign") in by_user
    assert ("alice", "policy.set", "policy.serial") in by_user
    assert [e for e in audit_events(cluster, "host-b", "vm.transfer") if e.user == "alice"]

    # files readable by root only, and the guest's secret on no command line
    for p in [a_dir, a_dir / "audit.db", a_dir / "journal.db", a_dir / "vm-policies" / "vm1.json",
              *a_dir.glob("run/**/console.log"), *a_dir.glob("audit.db-wal")]:  # fmt: skip
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, (p, oct(p.stat().st_mode))
    cmdline = Path(f"/proc/{seen['pid_a']}/cmdline").read_bytes()
    assert SECRET.encode() not in cmdline and SECRET.encode().hex().encode() not in cmdline


# ------------------------------------------------------------------ peers only
def _prepare_params(cluster: LocalCluster, vm: str) -> dict[str, Any]:
    return {
        "migration_id": str(uuid.uuid4()),
        "spec": {**spec(vm), "owner": "alice"},
        "options": {},
        "user": {"name": "alice", "roles": ["owner", "operator"], "tenant": "acme"},
        "policy": cluster.signed_policy("alice", vm),
        "audit_pub": "",
        "epoch": 1,
    }


def test_only_peers_get_anything_and_aborted_prepares_use_no_quota(make_cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster()
    assert cluster.ca is not None
    stranger = cluster.ca.issue_host("host-x", tmp_path / "host-x")
    # a second certificate for the name host-a: the agent's own key is sealed in its TPM
    peer = cluster.ca.issue_host("host-a", tmp_path / "host-a-again")

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        x = await _host_client(cluster, "host-b", stranger)
        try:
            out["prepare"] = await _denied(x, "incoming.prepare", _prepare_params(cluster, "vm9"))
            out["ping"] = await _denied(x, "ping", {})
        finally:
            await x.close()
        alice = await cluster.client("host-b", "alice")
        out["incoming_after_stranger"] = (await alice.call("host.status"))["incoming"]
        a = await _host_client(cluster, "host-b", peer)
        try:
            pids = []
            for _ in range(6):  # more than the hourly limit of 4, all aborted
                params = _prepare_params(cluster, "vm9")
                await a.call("incoming.prepare", params, timeout=60)
                st = await alice.call("host.status")
                pids += [i["pid"] for i in st["incoming"] if i["pid"]]
                await a.call("incoming.abort", {"migration_id": params["migration_id"]})
            out["pids"] = pids
            guard = await alice.call("guard.show")
            out["admission"] = guard["admission"]
        finally:
            await a.close()
            await alice.close()
        return out

    out = arun(go())
    assert out["prepare"].startswith("incoming.prepare denied: host host-x is not a peer")
    assert out["incoming_after_stranger"] == []
    assert len(out["pids"]) == 6, "each aborted prepare of a real peer was admitted"
    for pid in out["pids"]:
        assert not pid_alive(pid)
    denials = [
        e for e in audit_events(cluster, "host-b", "access.denied") if e.data["rule"] == "peers"
    ]
    assert {e.data["host"] for e in denials} == {"host-x"}


# ------------------------------------------------------------------ revocation
def test_revocation_reaches_every_agent_and_ends_open_connections(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster()
    cluster.add_user("mallory", ["operator"], tenant="acme")
    cluster.add_user("sam", ["security-admin"])
    ca_dir = cluster.root / "ca"
    before = (ca_dir / "crl.pem").read_text()

    async def open_conn() -> tuple[ControlClient, int]:
        m = await cluster.client("host-a", "mallory")
        await m.call("ping")
        sam = await cluster.client("host-b", "sam")
        n = (await sam.call("crl.show"))["number"]
        await sam.close()
        return m, n

    async def after(m: ControlClient, n0: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with pytest.raises(ControlError) as err:
            await m.call("ping", timeout=10)
        out["open"] = str(err.value)
        await m.close()
        sam = await cluster.client("host-b", "sam")
        try:
            for _ in range(100):  # host-b gets it from host-a, not from us
                out["number_b"] = (await sam.call("crl.show"))["number"]
                if out["number_b"] > n0:
                    break
                await asyncio.sleep(0.1)
            with pytest.raises(ControlError) as err:
                await sam.call("crl.update", {"crl": before})
            out["older"] = str(err.value)
        finally:
            await sam.close()
        return out

    loop = asyncio.new_event_loop()
    try:
        m, n0 = loop.run_until_complete(open_conn())
        cli = subprocess.run(
            [sys.executable, "-m", "trustmig.cli.main", "user", "revoke", "mallory",
             "--ca-dir", str(ca_dir), "--push", cluster.hosts["host-a"].control,
             "--credentials", str(cluster.users["sam"]), "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        pushed = json.loads(cli.stdout)["pushed"]
        out = loop.run_until_complete(after(m, n0))
    finally:
        loop.close()
    assert pushed[0]["installed"] is True and pushed[0]["closed"] == ["mallory"]
    assert out["number_b"] == pushed[0]["number"] > n0
    assert "older than number" in out["older"]
    assert [e for e in audit_events(cluster, "host-a", "access.revoked") if e.user == "mallory"]
    assert [e for e in audit_events(cluster, "host-b", "pki.crl") if e.outcome == "installed"]

    # a host whose CRL is gone does not start with revocation checking off
    cluster.kill_agent("host-b")
    (cluster.hosts["host-b"].dir / "pki" / "crl.pem").unlink()
    with pytest.raises(Exception):  # noqa: B017 - the agent exits; its log says why
        cluster.start_agent("host-b", timeout=20)
    assert "crl.pem does not exist" in cluster.log_tail("host-b", 20)


# ------------------------------------------------------------------ bad input
def _raw(cluster: LocalCluster, payloads: list[bytes]) -> list[dict[str, Any]]:
    c = cluster.user_credentials("alice")
    ctx = client_context(c, TrustBundle.load(c.ca_path, c.crl_path))
    host, port = cluster.hosts["host-a"].control.rsplit(":", 1)
    replies = []
    for payload in payloads:
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            tls.sendall(payload)
            buf = b""
            try:
                while True:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
            except (ssl.SSLError, ConnectionError, TimeoutError):
                pass
        (n,) = struct.unpack(">I", buf[:4])
        replies.append(json.loads(buf[4 : 4 + n]))
    return replies


def test_malformed_frames_get_a_one_line_answer(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(hosts=("host-a",))

    def frame(body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + body

    replies = _raw(cluster, [
        frame(b"{oops"),
        frame(b'{"v": 7, "id": 1, "op": "ping"}'),
        frame(b'{"v":1,"id":1,"op":"ping","params":' + b"[" * 5000 + b"]" * 5000 + b"}"),
        struct.pack(">I", 64 * 1024 * 1024),
    ])  # fmt: skip
    for r in replies:
        assert r["ok"] is False and r["code"] == "invalid" and "\n" not in r["error"], r
    assert "not JSON" in replies[0]["error"]
    assert "unsupported control protocol version 7" in replies[1]["error"]
    assert "nests deeper than" in replies[2]["error"]
    assert "exceeds" in replies[3]["error"]

    async def invalid_field() -> str:
        c = await cluster.client("host-a", "alice")
        try:
            with pytest.raises(ControlError) as err:
                await c.call("vm.start", {"spec": {"name": "v", "memory_mib": "lots"}})
            return str(err.value)
        finally:
            await c.close()

    line = arun(invalid_field())
    assert line.startswith("vm.start: field memory_mib: Input should be a valid integer"), line
    malformed = [
        e for e in audit_events(cluster, "host-a", "access.malformed") if e.user == "alice"
    ]
    assert len(malformed) == 4 and "not JSON" in malformed[0].data["reason"]
    assert os.path.exists(cluster.hosts["host-a"].dir)
