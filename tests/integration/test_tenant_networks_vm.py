"""Tenant-isolated guest networks on namespaced hosts: guests of two tenants on one host cannot
reach each other, while two guests of one tenant on two hosts reach each other before and after
one of them migrates; a NIC on a shared bridge is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trustmig.agent.client import ControlClient, ControlError
from trustmig.agent.local_cluster import LocalCluster
from trustmig.netns.topology import existing_namespaces

from .helpers import arun, assert_running_and_beating

pytestmark = [pytest.mark.vm, pytest.mark.tpm, pytest.mark.netns]
HOSTS = ("host-a", "host-b")
PORT = 7000
GUESTS = {  # name: (tenant, host, address, mac)
    "a1": ("acme", "host-a", "10.77.9.11", "52:54:00:77:09:11"),
    "e1": ("evil", "host-a", "10.77.9.12", "52:54:00:77:09:12"),
    "a2": ("acme", "host-b", "10.77.9.13", "52:54:00:77:09:13"),
}


@pytest.fixture
def lab(tmp_path: Path, guest_image: Any) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path / "cluster", HOSTS, netns=True)
    try:
        c.setup(accept_tenants={h: ["acme", "evil"] for h in HOSTS},
                tenant_vnis={"acme": 101, "evil": 102},
                extra_config=dict.fromkeys(HOSTS, "capacity = {vcpus = 8}"))  # fmt: skip
        c.add_user("alice", ["owner", "operator"], tenant="acme")
        c.add_user("eve", ["owner", "operator"], tenant="evil")
        c.start_agents()
        yield c
    finally:
        c.stop()
    assert c.netlab is not None and not set(c.netlab.namespaces) & existing_namespaces()


def guest(name: str, backend: dict[str, Any] | None = None) -> dict[str, Any]:
    tenant, _host, address, mac = GUESTS[name]
    return {
        "name": name, "memory_mib": 96, "tenant": tenant,
        "nics": [{"id": "n0", "mac": mac, "backend": backend or {"kind": "tenant"}}],
        "workload": {"mem_mib": 8, "serve_port": PORT, "addresses": {"n0": f"{address}/24"}},
    }  # fmt: skip


async def probe(cl: ControlClient, vm: str, to: str) -> tuple[str, int]:
    r = await cl.call("vm.probe", {"name": vm, "address": GUESTS[to][2], "port": PORT},
                      timeout=60)  # fmt: skip
    return r["result"], r["bytes"]


def test_tenants_are_apart_and_a_tenant_is_together_across_a_migration(lab: LocalCluster) -> None:
    owner = {"acme": "alice", "evil": "eve"}

    async def go() -> dict[str, Any]:
        cl = {(u, h): await lab.client(h, u) for u in ("alice", "eve") for h in HOSTS}
        try:
            for name, (tenant, host, _addr, _mac) in GUESTS.items():
                user = owner[tenant]
                policy = lab.signed_policy(user, name, tenant=tenant, allowed_users=[user])
                await cl[(user, host)].call("vm.start", {"spec": guest(name), "policy": policy},
                                            timeout=300)  # fmt: skip
            alice_a, alice_b, eve_a = cl[("alice", "host-a")], cl[("alice", "host-b")], cl[
                ("eve", "host-a")]  # fmt: skip
            r: dict[str, Any] = {
                "a1_to_a2": await probe(alice_a, "a1", "a2"),  # one tenant, two hosts
                "e1_to_a1": await probe(eve_a, "e1", "a1"),  # two tenants, one host
                "a1_to_e1": await probe(alice_a, "a1", "e1"),
            }
            res = await alice_b.call("migrate", {"vm": "a2", "to": "host-a", "options": {}},
                                     timeout=300)  # fmt: skip
            r["migrated"] = res["status"]
            r["a1_to_a2_after"] = await probe(alice_a, "a1", "a2")  # now on one host
            r["a2_to_a1_after"] = await probe(alice_a, "a2", "a1")
            r["e1_to_a2_after"] = await probe(eve_a, "e1", "a2")
            await assert_running_and_beating(alice_a, "a2")
            try:
                shared = {**guest("a1"), "name": "a3"}
                bridged = {"kind": "bridge", "bridge": "br-guest"}
                shared["nics"] = [{"id": "n0", "mac": "52:54:00:77:09:14", "backend": bridged}]
                shared["workload"] = {"mem_mib": 8}
                await alice_a.call("vm.start", {"spec": shared}, timeout=120)
                r["shared"] = "started"
            except ControlError as e:
                r["shared"] = str(e)
            return r
        finally:
            for c in cl.values():
                await c.close()

    r = arun(go())
    assert r["a1_to_a2"] == ("ok", 1024)
    assert r["e1_to_a1"][0] in ("timeout", "unreachable", "refused") and r["e1_to_a1"][1] == 0
    assert r["a1_to_e1"][0] in ("timeout", "unreachable", "refused") and r["a1_to_e1"][1] == 0
    assert r["migrated"] == "completed"
    assert r["a1_to_a2_after"] == ("ok", 1024) and r["a2_to_a1_after"] == ("ok", 1024)
    assert r["e1_to_a2_after"][1] == 0
    assert "shared bridge br-guest" in r["shared"]
