"""Evacuating a host with real agents, swtpm and guests: every VM that may leave runs exactly
once on a verified, allowed peer, the dry-run plan is what runs, a VM whose policy allows no
peer stays (named, with the rule), and the lying host receives nothing and is quarantined."""

from __future__ import annotations

from typing import Any

import pytest

from trustmig.agent.client import ControlError

from .helpers import arun, assert_absent, assert_running_and_beating, spec, start_vm

pytestmark = [pytest.mark.vm, pytest.mark.tpm]
ROLES = ["operator", "cluster-admin"]


def test_evacuate_moves_each_vm_once_to_allowed_verified_peers(make_cluster) -> None:  # type: ignore[no-untyped-def]
    liar = {"host-l": "trustmig.lab.liar_agent"}
    c = make_cluster(hosts=("host-a", "host-b", "host-c", "host-l"), agent_module=liar,
                     defer_start=True)  # fmt: skip
    c.add_user("cleo", ["cluster-admin"])
    c.start_agents()

    async def go() -> dict[str, Any]:
        clients = {h: await c.client(h, "alice") for h in c.host_names}
        cleo = await c.client("host-a", "cleo")
        try:
            a = clients["host-a"]
            await start_vm(a, spec("vm1", workload=16), c, allowed_roles=ROLES)
            await start_vm(a, spec("vm2", workload=16), c, allowed_roles=ROLES, hosts=["host-c"])
            await start_vm(a, spec("vm3", workload=16), c, allowed_roles=ROLES, countries=["SE"])
            with pytest.raises(ControlError) as denied:
                await a.call("host.evacuate", {"dry_run": True})
            dry = await cleo.call("host.evacuate", {"dry_run": True}, timeout=120)
            events: list[dict[str, Any]] = []
            done = await cleo.call("host.evacuate", {}, on_event=events.append, timeout=600)
            placed = {h: [v["name"] for v in (await cl.call("vm.list"))["vms"]]
                      for h, cl in clients.items()}  # fmt: skip
            for m in done["moves"]:
                await assert_running_and_beating(clients[m["destination"]], m["vm"])
                await assert_absent(a, m["vm"])
            await assert_running_and_beating(a, "vm3")
            quarantine = (await cleo.call("guard.quarantine"))["quarantined"]
            return {"denied": str(denied.value), "dry": dry, "done": done, "placed": placed,
                    "events": events, "quarantine": quarantine}  # fmt: skip
        finally:
            for cl in (*clients.values(), cleo):
                await cl.close()

    r = arun(go())
    assert "role" in r["denied"]
    dry, done = r["dry"], r["done"]
    planned = {(m["vm"], m["destination"]) for m in dry["moves"]}
    assert planned == {(m["vm"], m["destination"]) for m in done["moves"]}
    assert dict(planned)["vm2"] == "host-c"
    assert dict(planned)["vm1"] in ("host-b", "host-c")
    assert [(s["vm"], s["code"]) for s in dry["stuck"]] == [("vm3", "no_allowed_host")]
    assert "SE" in dry["stuck"][0]["why"] or "countr" in dry["stuck"][0]["why"]
    assert sorted(o["status"] for o in done["outcomes"]) == ["completed", "completed"]
    assert done["remaining"] == ["vm3"]
    everywhere = [vm for names in r["placed"].values() for vm in names]
    assert sorted(everywhere) == ["vm1", "vm2", "vm3"]  # each VM runs exactly once
    assert r["placed"]["host-l"] == []
    liar = {h["host"]: h for h in dry["hosts"]}["host-l"]
    assert (liar["accept"], liar["rule"]) == (False, "report_exceeds_attested")
    assert "host-l" in r["quarantine"]
    finished = [e["vm"] for e in r["events"]
                if e.get("event") == "evacuate" and e["state"] == "completed"]  # fmt: skip
    assert sorted(finished) == ["vm1", "vm2"]
