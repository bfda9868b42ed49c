"""Co-residency decided by the host from what really runs there: ``vm start`` and an arriving
migration are refused by a resident's rule and by the newcomer's own, and allowed where the
rules permit; a refusal never names another tenant's VM."""

from __future__ import annotations

from typing import Any

import pytest

from trustmig.agent.client import ControlClient, ControlError

from .helpers import arun, assert_running_and_beating, spec

pytestmark = [pytest.mark.vm, pytest.mark.tpm]
HOSTS = ("host-a", "host-b", "host-c")


async def boot(c: Any, cl: ControlClient, user: str, tenant: str, name: str, **rules: Any) -> str:
    """Start ``name`` with its owner's signed policy; '' if it runs, else the refusal."""
    s = {**spec(name, memory=96, workload=8), "tenant": tenant}
    policy = c.signed_policy(user, name, tenant=tenant, allowed_users=[user], **rules)
    try:
        await cl.call("vm.start", {"spec": s, "policy": policy}, timeout=300)
    except ControlError as e:
        return str(e)
    return ""


async def migrate(cl: ControlClient, vm: str, to: str) -> str:
    try:
        await cl.call("migrate", {"vm": vm, "to": to, "options": {}}, timeout=300)
    except ControlError as e:
        return str(e)
    return ""


def test_a_host_refuses_neighbours_its_residents_or_the_newcomer_forbid(make_cluster: Any) -> None:
    both = {h: ["acme", "evil"] for h in HOSTS}
    c = make_cluster(hosts=HOSTS, accept_tenants=both, defer_start=True)
    c.add_user("eve", ["owner", "operator"], tenant="evil")
    c.start_agents()

    async def go() -> dict[str, Any]:
        alice = {h: await c.client(h, "alice") for h in HOSTS}
        eve = {h: await c.client(h, "eve") for h in HOSTS}
        try:
            r: dict[str, Any] = {}
            r["victim"] = await boot(c, alice["host-a"], "alice", "acme", "victim",
                                     neighbours="tenant")  # fmt: skip
            r["spy_next_to_victim"] = await boot(c, eve["host-a"], "eve", "evil", "spy")
            r["buddy"] = await boot(c, alice["host-a"], "alice", "acme", "buddy")
            r["spy"] = await boot(c, eve["host-b"], "eve", "evil", "spy")
            r["picky"] = await boot(c, alice["host-b"], "alice", "acme", "picky",
                                    never_with_tenants=["evil"])  # fmt: skip
            r["hermit"] = await boot(c, alice["host-c"], "alice", "acme", "hermit",
                                     neighbours="none")  # fmt: skip
            r["spy_to_a"] = await migrate(eve["host-b"], "spy", "host-a")
            r["buddy_to_c"] = await migrate(alice["host-a"], "buddy", "host-c")
            r["buddy_to_b"] = await migrate(alice["host-a"], "buddy", "host-b")
            r["placed"] = {h: sorted(v["name"] for v in (await cl.call("vm.list"))["vms"])
                           for h, cl in alice.items()}  # fmt: skip
            r["spy_placed"] = {h: sorted(v["name"] for v in (await cl.call("vm.list"))["vms"])
                               for h, cl in eve.items()}  # fmt: skip
            await assert_running_and_beating(alice["host-b"], "buddy")
            await assert_running_and_beating(eve["host-b"], "spy")
            return r
        finally:
            for cl in (*alice.values(), *eve.values()):
                await cl.close()

    r = arun(go())
    assert r["victim"] == r["buddy"] == r["spy"] == r["hermit"] == ""
    # vm start refused by a resident's rule, without naming the resident to another tenant
    assert "co_residency.resident_neighbours" in r["spy_next_to_victim"]
    assert "victim" not in r["spy_next_to_victim"]
    # vm start refused by the newcomer's own rule
    assert "co_residency.never_with_tenants" in r["picky"]
    # an arrival refused by a resident's rule: the VM stays running where it was
    assert "co_residency.resident_neighbours" in r["spy_to_a"] and "victim" not in r["spy_to_a"]
    assert r["spy_placed"]["host-b"] == ["spy"]
    # a resident of the same tenant is named
    assert "co_residency.resident_neighbours" in r["buddy_to_c"] and "hermit" in r["buddy_to_c"]
    # allowed where the rules permit: buddy minds no neighbours, and spy minds none either
    assert r["buddy_to_b"] == ""
    assert r["placed"] == {"host-a": ["victim"], "host-b": ["buddy"], "host-c": ["hermit"]}
