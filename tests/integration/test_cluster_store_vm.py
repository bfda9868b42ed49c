"""A cluster of real agents on a real PostgreSQL store: the store follows every guest, and a
store killed in the middle of an evacuation loses and duplicates nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from trustmig.agent.local_pg import PgServer
from trustmig.store import ClusterStore

from .helpers import arun, assert_running_and_beating, spec, start_vm

pytestmark = [pytest.mark.vm, pytest.mark.tpm, pytest.mark.pg]
ROLES = ["operator", "cluster-admin"]
HOSTS = ("host-a", "host-b", "host-c")


@pytest.fixture
def pg() -> Iterator[PgServer]:
    srv = PgServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def _owners(url: str) -> dict[str, tuple[str, int]]:
    store = ClusterStore.open(url)
    try:
        return {v.name: (v.owner, v.epoch) for v in store.vms()}
    finally:
        store.close()


async def _until(check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = await asyncio.to_thread(check)
            if got:
                return got
        except Exception:  # noqa: BLE001 - the store may still be starting
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:.0f} s")
        await asyncio.sleep(0.5)


def test_a_store_killed_mid_evacuation_loses_and_duplicates_nothing(make_cluster, pg) -> None:  # type: ignore[no-untyped-def]
    store_cfg = f'store = {{url = "{pg.url}", interval_s = 0.5}}'
    c = make_cluster(hosts=HOSTS, extra_config=dict.fromkeys(HOSTS, store_cfg), defer_start=True)
    c.add_user("cleo", ["cluster-admin"])
    c.start_agents()
    names = ("vm1", "vm2", "vm3")

    async def go() -> dict[str, Any]:
        clients = {h: await c.client(h, "alice") for h in HOSTS}
        cleo = await c.client("host-a", "cleo")
        try:
            for n in names:
                await start_vm(clients["host-a"], spec(n, workload=48), c, allowed_roles=ROLES)
            before = await _until(lambda: len(_owners(pg.url)) == 3 and _owners(pg.url))
            dry = await cleo.call("host.evacuate", {"dry_run": True}, timeout=120)
            started = asyncio.Event()

            def event(ev: dict[str, Any]) -> None:
                if ev.get("event") == "evacuate" and ev["state"] == "started":
                    started.set()

            params = {"parallel": 1, "options": {"max_bandwidth_mibps": 24}}
            run = asyncio.ensure_future(
                cleo.call("host.evacuate", params, on_event=event, timeout=600)
            )
            await started.wait()
            await asyncio.to_thread(pg.kill)  # the database dies while VMs move
            done = await run
            down = (await clients["host-b"].call("host.status"))["store"]
            placed = {h: [v["name"] for v in (await cl.call("vm.list"))["vms"]]
                      for h, cl in clients.items()}  # fmt: skip
            for m in done["moves"]:
                await assert_running_and_beating(clients[m["destination"]], m["vm"])
            await asyncio.to_thread(pg.start)
            expect = {m["vm"]: m["destination"] for m in done["moves"]}
            after = await _until(lambda: {n: o for n, (o, _) in _owners(pg.url).items()} == expect
                                 and _owners(pg.url))  # fmt: skip
            return {"before": before, "dry": dry, "done": done, "down": down, "placed": placed,
                    "after": after}  # fmt: skip
        finally:
            for cl in (*clients.values(), cleo):
                await cl.close()

    r = arun(go())
    assert r["before"] == dict.fromkeys(names, ("host-a", 1))
    assert {m["vm"] for m in r["dry"]["moves"]} == set(names)
    assert [o["status"] for o in r["done"]["outcomes"]] == ["completed"] * 3
    assert r["done"]["remaining"] == []
    assert r["down"]["reachable"] is False
    everywhere = sorted(vm for vms in r["placed"].values() for vm in vms)
    assert everywhere == sorted(names)  # each VM runs exactly once
    assert r["placed"]["host-a"] == []
    # the store caught up: every VM on the host that runs it, one epoch later, none twice
    assert all(epoch == 2 and owner != "host-a" for owner, epoch in r["after"].values())
    assert sorted(r["after"]) == sorted(names)


def _cli(c: Any, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "trustmig.cli.main", *args, "--agent",
           c.hosts["host-a"].control, "--credentials", str(c.users[user]), "--json"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _placed(c: Any) -> dict[str, list[str]]:
    async def ask() -> dict[str, list[str]]:
        out = {}
        for h in HOSTS:
            cl = await c.client(h, "alice")
            try:
                out[h] = sorted(v["name"] for v in (await cl.call("vm.list"))["vms"])
            finally:
                await cl.close()
        return out

    return arun(ask())


def _beating(c: Any, where: dict[str, list[str]]) -> None:
    async def check() -> None:
        for h, vms in where.items():
            cl = await c.client(h, "alice")
            try:
                for vm in vms:
                    await assert_running_and_beating(cl, vm)
            finally:
                await cl.close()

    arun(check())


def test_balance_then_consolidate_run_exactly_their_dry_run_plans(
    make_cluster, pg, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    small = (
        f'store = {{url = "{pg.url}", interval_s = 1.0}}\ncapacity = {{mem_mib = 512, vcpus = 16}}'
    )
    c = make_cluster(hosts=HOSTS, extra_config=dict.fromkeys(HOSTS, small), defer_start=True)
    c.add_user("cleo", ["cluster-admin"])
    c.start_agents()
    names = ("vm1", "vm2", "vm3")

    async def boot() -> None:
        a = await c.client("host-a", "alice")
        try:
            for n in names:
                await start_vm(a, spec(n, memory=128, workload=16), c, allowed_roles=ROLES)
        finally:
            await a.close()

    arun(boot())
    refused = _cli(c, "alice", "balance", "--dry-run")
    assert refused.returncode != 0 and "cluster-admin" in json.loads(refused.stdout)["error"]

    # balance: host-a holds 3 x 128 of 512 MiB, its peers nothing
    dry = _cli(c, "cleo", "balance", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["vantage"] == "host-a" and "outcomes" not in plan
    assert [m["source"] for m in plan["moves"]] == ["host-a", "host-a"]
    assert sorted(m["destination"] for m in plan["moves"]) == ["host-b", "host-c"]
    assert plan["after"]["spread"] < plan["before"]["spread"]
    saved = tmp_path / "balance.json"
    saved.write_text(dry.stdout)
    ran = _cli(c, "cleo", "balance", "--plan", str(saved))
    assert ran.returncode == 0, ran.stderr
    done = json.loads(ran.stdout)
    moved = [(o["vm"], o["destination"], o["status"]) for o in done["outcomes"]]
    assert moved == [(m["vm"], m["destination"], "completed") for m in plan["moves"]]
    placed = _placed(c)
    assert sorted(vm for vms in placed.values() for vm in vms) == sorted(names)  # each once
    assert all(len(vms) == 1 for vms in placed.values())
    _beating(c, placed)

    # balanced now, and the VMs that just moved cool down: a second plan moves nothing
    again = json.loads(_cli(c, "cleo", "balance", "--dry-run").stdout)
    assert again["moves"] == []
    # the saved plan no longer fits (its VMs moved): refused, nothing runs
    stale = _cli(c, "cleo", "balance", "--plan", str(saved))
    assert stale.returncode != 0 and "no longer fits" in json.loads(stale.stdout)["error"]

    # consolidate: one host can hold all three; the two it empties can be powered down
    dry = _cli(c, "cleo", "consolidate", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert len(plan["moves"]) == 2 and len(plan["freed_hosts"]) == 2
    saved = tmp_path / "consolidate.json"
    saved.write_text(dry.stdout)
    ran = _cli(c, "cleo", "consolidate", "--plan", str(saved))
    assert ran.returncode == 0, ran.stderr
    done = json.loads(ran.stdout)
    assert [(o["vm"], o["destination"]) for o in done["outcomes"]] == [
        (m["vm"], m["destination"]) for m in plan["moves"]
    ]
    placed = _placed(c)
    for h in plan["freed_hosts"]:
        assert placed[h] == []
    (keeper,) = set(HOSTS) - set(plan["freed_hosts"])
    assert placed[keeper] == sorted(names)
    _beating(c, placed)
    owners = _until_sync(lambda: {n: o for n, (o, _) in _owners(pg.url).items()})
    assert owners == dict.fromkeys(names, keeper)


def _until_sync(read: Any, timeout: float = 30.0) -> Any:
    """The store's view once it stopped changing (agents write it every round)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(1.5)
        now = read()
        if now == last and len(set(now.values())) == 1:
            return now
        last = now
    return last
