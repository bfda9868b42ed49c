"""Live migration of real guests between two agent processes, through the secure channel."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from trustmig.hypervisor.heartbeat import analyse

from .helpers import (
    arun,
    assert_absent,
    assert_running_and_beating,
    incoming_pids,
    migrate_with_hook,
    pid_alive,
    spec,
    start_vm,
)

pytestmark = pytest.mark.vm


def _migrate_ok(make_cluster, s, options):  # type: ignore[no-untyped-def]
    cluster = make_cluster()

    async def go() -> dict:
        src = await cluster.client("host-a", "alice")
        dst = await cluster.client("host-b", "alice")
        try:
            await start_vm(src, s, cluster)
            await asyncio.sleep(0.5)
            before = await src.call("vm.check", {"name": s["name"]})
            res = await src.call(
                "migrate", {"vm": s["name"], "to": "host-b", "options": options}, timeout=300
            )
            await asyncio.sleep(0.5)
            await assert_running_and_beating(dst, s["name"])
            await assert_absent(src, s["name"])
            after = await dst.call("vm.check", {"name": s["name"]})
            hbs = await dst.call("vm.heartbeats", {"name": s["name"]})
            cont = analyse(
                [tuple(h) for h in res["source_heartbeats"]], [tuple(h) for h in hbs["heartbeats"]]
            )
            return {"res": res, "before": before, "after": after, "cont": cont}
        finally:
            await src.close()
            await dst.close()

    out = arun(go())
    res, before, after, cont = out["res"], out["before"], out["after"], out["cont"]
    assert res["status"] == "completed"
    assert res["channel"] == "secure"
    assert after["bad_pages"] == 0 and after["marker_ok"] == after["marker_total"]
    assert cont.continuous, cont.reason
    return res, before, after


def test_precopy_idle_guest_memory_identical(make_cluster) -> None:  # type: ignore[no-untyped-def]
    res, before, after = _migrate_ok(make_cluster, spec(rate=0), {"mode": "precopy"})
    assert res["mode"] == "precopy"
    assert before["digest"] == after["digest"], "memory digest changed across migration"


def test_precopy_with_dirtying_workload(make_cluster) -> None:  # type: ignore[no-untyped-def]
    res, _, _ = _migrate_ok(make_cluster, spec(rate=32), {"mode": "precopy"})
    assert res["rounds"] >= 2


def test_postcopy(make_cluster) -> None:  # type: ignore[no-untyped-def]
    res, _, _ = _migrate_ok(
        make_cluster,
        spec(memory=384, workload=192, rate=128),
        {"mode": "postcopy", "postcopy_after_rounds": 1, "max_bandwidth_mibps": 256},
    )
    assert res["mode"] == "postcopy"


def test_multifd(make_cluster) -> None:  # type: ignore[no-untyped-def]
    res, _, _ = _migrate_ok(make_cluster, spec(rate=8), {"mode": "precopy", "multifd": 2})
    assert res["streams"] == 3


# ---------------------------------------------------------------------------- failure injection
SLOW = {"mode": "precopy", "max_bandwidth_mibps": 24}


def _inject(make_cluster, hook_factory, *, when=20 * 1024 * 1024, setup=None):  # type: ignore[no-untyped-def]
    cluster = make_cluster(**(setup or {}))

    async def go() -> tuple:
        src = await cluster.client("host-a", "alice")
        dst = await cluster.client("host-b", "alice")
        try:
            await start_vm(src, spec(memory=320, workload=160, rate=4), cluster)
            seen_pids: list[int] = []

            async def hook() -> None:
                seen_pids.extend(await incoming_pids(dst))
                r = hook_factory(cluster, seen_pids)
                if asyncio.iscoroutine(r):
                    await r

            res, err = await migrate_with_hook(
                cluster, src, "vm1", "host-b", SLOW, when_bytes=when, hook=hook
            )
            await assert_running_and_beating(src, "vm1")
            check = await src.call("vm.check", {"name": "vm1"})
            return res, err, seen_pids, check
        finally:
            await src.close()
            await dst.close()

    res, err, pids, check = arun(go())
    assert res is None, "migration should have failed"
    assert err
    assert check["bad_pages"] == 0 and check["marker_ok"] == check["marker_total"]
    assert pids, "no incoming QEMU was seen on the destination"
    for p in pids:
        for _ in range(100):
            if not pid_alive(p):
                break
            import time

            time.sleep(0.05)
        assert not pid_alive(p), "destination QEMU still alive: two copies"
    return err, cluster


def test_kill_destination_qemu_mid_migration(make_cluster) -> None:  # type: ignore[no-untyped-def]
    def hook(cluster, pids):  # type: ignore[no-untyped-def]
        os.kill(pids[0], signal.SIGKILL)

    err, _ = _inject(make_cluster, hook)
    assert "stream" in err or "destination" in err


def test_break_tcp_stream_mid_migration(make_cluster) -> None:  # type: ignore[no-untyped-def]
    from trustmig.agent.local_cluster import free_port
    from trustmig.lab.proxy import Cutter, MitmProxy

    port = free_port()
    cutter = Cutter(after_bytes=30 * 1024 * 1024)
    with MitmProxy(("127.0.0.1", port), cutter) as proxy:
        err, _ = _inject(
            make_cluster,
            lambda c, p: None,
            when=1,
            setup={
                "data_listen": {"host-b": f"127.0.0.1:{port}"},
                "data_advertise": {"host-b": proxy.hostport},
            },
        )
    assert cutter.cut
    assert "stream 0" in err


def test_qemu_native_tls_channel_is_attested_and_pinned(make_cluster) -> None:  # type: ignore[no-untyped-def]

    cluster = make_cluster()

    async def go():  # type: ignore[no-untyped-def]
        a = await cluster.client("host-a", "alice")
        b = await cluster.client("host-b", "alice")
        try:
            await start_vm(a, spec(), cluster)
            res = await a.call(
                "migrate",
                {"vm": "vm1", "to": "host-b", "options": {"channel": "qemu-tls"}},
                timeout=300,
            )
            await assert_running_and_beating(b, "vm1")
            await assert_absent(a, "vm1")
            return res, await b.call("vm.check", {"name": "vm1"})
        finally:
            await a.close()
            await b.close()

    res, check = arun(go())
    assert res["status"] == "completed" and res["channel"] == "qemu-tls"
    assert res["attestation"] == "verified" and res["bytes_transferred"] > 64 << 20
    assert check["bad_pages"] == 0 and check["marker_ok"] == check["marker_total"]
