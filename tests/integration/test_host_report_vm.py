"""Measured load with real agents, swtpm and a running guest: the honest host's report is what
its guest really uses, quoted by its TPM; the lying host's is refused and the liar quarantined."""

from __future__ import annotations

import pytest

from trustmig.agent.client import ControlError

from .helpers import arun, spec, start_vm

pytestmark = [pytest.mark.vm, pytest.mark.tpm]


def test_loads_are_measured_quoted_and_a_liar_is_quarantined(make_cluster) -> None:  # type: ignore[no-untyped-def]
    liar = {"host-l": "trustmig.lab.liar_agent"}
    c = make_cluster(hosts=("host-a", "host-b", "host-l"), agent_module=liar, defer_start=True)
    c.add_user("cleo", ["cluster-admin"])
    c.start_agents()

    async def go():  # type: ignore[no-untyped-def]
        alice_b = await c.client("host-b", "alice")
        alice_a = await c.client("host-a", "alice")
        cleo = await c.client("host-a", "cleo")
        try:
            await start_vm(alice_b, spec(memory=256, workload=64, rate=8), c)
            with pytest.raises(ControlError) as denied:
                await alice_a.call("cluster.loads")
            loads = (await cleo.call("cluster.loads", timeout=60))["hosts"]
            quarantine = (await cleo.call("guard.quarantine"))["quarantined"]
            return str(denied.value), {h["host"]: h for h in loads}, quarantine
        finally:
            await alice_b.close()
            await alice_a.close()
            await cleo.close()

    denied, loads, quarantine = arun(go())
    assert "role" in denied
    honest = loads["host-b"]
    assert honest["accept"] and honest["rule"] == "report_ok"
    assert honest["attested"]["mem_mib"] == honest["report"]["total_mem_mib"]
    (vm,) = honest["report"]["vms"]
    assert (vm["name"], vm["mem_mib"]) == ("vm1", 256)
    assert 0 < vm["rss_mib"] <= 256 + 128  # QEMU's own overhead on top of guest RAM
    assert vm["cpu_cores"] > 0  # the guest's workload runs
    liar = loads["host-l"]
    assert (liar["accept"], liar["rule"], liar["lie"]) == (False, "report_exceeds_attested", True)
    assert "host-l" in quarantine and "host-b" not in quarantine
