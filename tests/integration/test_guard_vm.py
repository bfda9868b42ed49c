"""Availability against lying and greedy peers, with real agents and guests.

A destination that inflates its resources is refused before any memory leaves and quarantined
until a security administrator clears it; admission caps inbound migrations per host; a VM's
policy caps how often it may move (no ping-pong).
"""

from __future__ import annotations

import asyncio

import pytest

from trustmig.agent.client import ControlError
from trustmig.agent.local_cluster import free_port
from trustmig.lab.proxy import MitmProxy, Sniffer

from .helpers import (
    arun,
    assert_absent,
    assert_running_and_beating,
    incoming_pids,
    pid_alive,
    spec,
    start_vm,
)

pytestmark = pytest.mark.vm


def test_lying_destination_is_refused_and_quarantined(make_cluster) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    sniff = Sniffer(b"\x00unused")
    with MitmProxy(("127.0.0.1", port), sniff) as proxy:
        c = make_cluster(
            data_listen={"host-b": f"127.0.0.1:{port}"},
            data_advertise={"host-b": proxy.hostport},
            agent_module={"host-b": "trustmig.lab.liar_agent"},
            defer_start=True,
        )
        c.add_user("sam", ["security-admin"])
        c.start_agents()

        async def go():  # type: ignore[no-untyped-def]
            a = await c.client("host-a", "alice")
            b = await c.client("host-b", "alice")
            sam = await c.client("host-a", "sam")
            try:
                await start_vm(a, spec(), c)
                with pytest.raises(ControlError) as first:
                    await a.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}})
                await assert_running_and_beating(a, "vm1")
                await assert_absent(b, "vm1")
                leftovers = [p for p in await incoming_pids(b) if pid_alive(p)]
                q = await a.call("guard.quarantine")
                # the next attempt is refused before any connection to the liar
                with pytest.raises(ControlError) as second:
                    await a.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}})
                with pytest.raises(ControlError) as denied:
                    await a.call("guard.clear", {"host": "host-b"})
                cleared = await sam.call("guard.clear", {"host": "host-b"})
                q2 = await a.call("guard.quarantine")
                ev = (await sam.call("audit.show", {"limit": 200}))["events"]
                check = await a.call("vm.check", {"name": "vm1"})
                return (
                    str(first.value),
                    str(second.value),
                    str(denied.value),
                    q,
                    cleared,
                    q2,
                    ev,
                    check,
                    leftovers,
                )
            finally:
                await a.close()
                await b.close()
                await sam.close()

        first, second, denied, q, cleared, q2, ev, check, leftovers = arun(go())
    assert "quarantined" in first and "claim_exceeds_attested" in first, first
    assert sniff.bytes_seen < 64 * 1024, "guest memory crossed the wire to a lying host"
    assert not leftovers, "destination QEMU survived the refusal"
    assert (
        "host-b" in q["quarantined"]
        and "claim_exceeds_attested" in q["quarantined"]["host-b"]["reason"]
    )
    assert "is quarantined" in second and "trustmig guard clear host-b" in second, second
    assert "guard.clear denied" in denied and "security-admin" in denied, denied
    assert cleared["by"] == "sam" and not q2["quarantined"]
    assert q2["cleared"][-1]["cleared_by"] == "sam"
    kinds = [(e["kind"], e["outcome"]) for e in ev]
    assert ("guard.claim", "lie") in kinds and ("guard.quarantine", "quarantined") in kinds
    assert ("guard.quarantine", "cleared") in kinds
    assert check["bad_pages"] == 0 and check["marker_ok"] == check["marker_total"]


def test_honest_claim_is_checked_and_reported(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()

    async def go():  # type: ignore[no-untyped-def]
        a = await c.client("host-a", "alice")
        try:
            await start_vm(a, spec(), c)
            return await a.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}})
        finally:
            await a.close()

    res = arun(go())
    claim = res["destination_claim"]
    assert claim["rule"] == "claim_ok"
    assert claim["claim"]["host"] == "host-b" and claim["claim"]["nonce"] == res["migration_id"]
    assert claim["claim"]["free_mem_mib"] >= 256


def test_third_concurrent_inbound_migration_is_refused_with_reason(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(
        extra_config={
            "host-a": "admission = {max_outbound_per_host = 4, max_per_tenant = 4}",
            "host-b": "admission = {max_inbound_per_host = 2, max_per_tenant = 4, queue_max = 0}",
        }
    )
    slow = {"mode": "precopy", "max_bandwidth_mibps": 16}

    async def go():  # type: ignore[no-untyped-def]
        a = await c.client("host-a", "alice")
        b = await c.client("host-b", "alice")
        try:
            for i in (1, 2, 3):
                await start_vm(a, spec(f"vm{i}", memory=192, workload=96), c)
            transferring: list[asyncio.Event] = [asyncio.Event(), asyncio.Event()]

            def on(i: int):  # type: ignore[no-untyped-def]
                async def ev(e):  # type: ignore[no-untyped-def]
                    if e.get("event") == "progress":
                        transferring[i].set()

                return ev

            runs = [
                asyncio.create_task(
                    a.call(
                        "migrate",
                        {"vm": f"vm{i + 1}", "to": "host-b", "options": slow},
                        on_event=on(i),
                        timeout=300,
                    )
                )
                for i in (0, 1)
            ]
            await asyncio.wait_for(asyncio.gather(*(t.wait() for t in transferring)), 120)
            with pytest.raises(ControlError) as third:
                await a.call("migrate", {"vm": "vm3", "to": "host-b", "options": slow})
            done = await asyncio.gather(*runs)
            await assert_running_and_beating(a, "vm3")
            return str(third.value), done, await b.call("vm.list")
        finally:
            await a.close()
            await b.close()

    third, done, listing = arun(go())
    assert "inbound" in third and "refused" in third, third
    assert all(d["status"] == "completed" for d in done)
    assert sorted(v["name"] for v in listing["vms"]) == ["vm1", "vm2"]


def test_vm_cannot_move_more_often_than_its_policy_allows(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()

    async def go():  # type: ignore[no-untyped-def]
        a = await c.client("host-a", "alice")
        b = await c.client("host-b", "alice")
        try:
            await start_vm(a, spec(), c, max_per_hour=1)
            first = await a.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}})
            with pytest.raises(ControlError) as back:
                await b.call("migrate", {"vm": "vm1", "to": "host-a", "options": {}})
            await assert_running_and_beating(b, "vm1")
            await assert_absent(a, "vm1")
            return first, str(back.value)
        finally:
            await a.close()
            await b.close()

    first, back = arun(go())
    assert first["status"] == "completed"
    assert "DENY" in back and "max_per_hour" in back and "in the last hour" in back, back


def test_flood_during_a_migration_does_not_stop_it_and_memory_stays_bounded(make_cluster) -> None:  # type: ignore[no-untyped-def]
    from trustmig.config import parse_hostport
    from trustmig.lab.flood import ALL_KINDS, Flood, FloodSpec, RssSampler

    c = make_cluster()
    hb = c.hosts["host-b"]
    spec_ = FloodSpec(
        targets=[parse_hostport(hb.control), parse_hostport(hb.data_listen)],
        kinds=ALL_KINDS,
        rate_per_s=1000,
        max_attempts=20_000,
        duration_s=60,
        max_open=256,
        hold_s=10,
        source_ips=tuple(f"127.0.0.{i}" for i in range(2, 10)),
    )

    async def go():  # type: ignore[no-untyped-def]
        a = await c.client("host-a", "alice")
        b = await c.client("host-b", "alice")
        try:
            await start_vm(a, spec(memory=384, workload=192, rate=8), c)
            assert hb.pid is not None
            with RssSampler(hb.pid, interval_ms=50) as rss, Flood(spec_) as flood:
                await asyncio.sleep(2)  # the flood is at full rate before the migration starts
                res = await a.call(
                    "migrate", {"vm": "vm1", "to": "host-b", "options": {}}, timeout=300
                )
                await asyncio.sleep(1)
            await assert_running_and_beating(b, "vm1")
            await assert_absent(a, "vm1")
            check = await b.call("vm.check", {"name": "vm1"})
            guard = await b.call("guard.show")
            return res, flood.report(), rss.stats(), check, guard
        finally:
            await a.close()
            await b.close()

    res, flood, rss, check, guard = arun(go())
    assert res["status"] == "completed"
    assert check["bad_pages"] == 0 and check["marker_ok"] == check["marker_total"]
    assert flood.total_attempted > 1000  # the flood really ran during the migration
    hits = guard["guard"]["counters"]
    assert hits.get("rate", 0) + hits.get("half_open", 0) + hits.get("half_open_per_peer", 0) > 100
    # the agent holds no per-attempt state beyond its bounded tables
    assert rss.max_kib - rss.first_kib < 64 * 1024, rss


def test_a_flood_from_the_peers_own_address_does_not_shut_the_peer_out(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """Garbage and half-open connections at 400/s from 127.0.0.1 (the source agent's address)
    on the destination's data port: the migration goes through, the flood is refused by the
    gate's proof (never by a budget on the address both share)."""
    from trustmig.config import parse_hostport
    from trustmig.lab.flood import Flood, FloodSpec

    c = make_cluster()
    hb = c.hosts["host-b"]
    spec_ = FloodSpec(
        targets=[parse_hostport(hb.data_listen)], kinds=("garbage", "halfopen"),
        rate_per_s=400, max_attempts=20_000, duration_s=60, max_open=512, hold_s=10,
        source_ips=("127.0.0.1",),
    )  # fmt: skip

    async def go():  # type: ignore[no-untyped-def]
        a = await c.client("host-a", "alice")
        b = await c.client("host-b", "alice")
        try:
            await start_vm(a, spec(memory=256, workload=64, rate=4), c)
            before = (await b.call("guard.show"))["guard"]["counters"]
            with Flood(spec_) as flood:
                await asyncio.sleep(2)
                res = await a.call(
                    "migrate", {"vm": "vm1", "to": "host-b", "options": {}}, timeout=300
                )
            await assert_running_and_beating(b, "vm1")
            await assert_absent(a, "vm1")
            after = (await b.call("guard.show"))["guard"]["counters"]
            return res, flood.report(), before, after
        finally:
            await a.close()
            await b.close()

    res, flood, before, after = arun(go())
    assert res["status"] == "completed", res
    assert flood.total_attempted > 500
    hits = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    # the flood was refused by what its first bytes failed to prove, or waited out
    assert (
        hits.get("first_message", 0) + hits.get("proof_deadline", 0) + hits.get("evicted", 0) > 100
    ), hits
    assert hits.get("proven", 0) >= 1, hits  # the source's stream 0
    # and no budget by address refused anyone: the source agent shares 127.0.0.1
    assert hits.get("rate", 0) == hits.get("half_open_per_peer", 0) == 0, hits
