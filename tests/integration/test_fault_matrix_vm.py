"""The administrator's worst day: agents killed (SIGKILL) or stopped (SIGTERM) at every phase.

One cluster, one guest, migrated back and forth between host-a and host-b; each case kills the
source agent, the destination agent or both at one phase of a migration, starts them again and
then checks the real outcome: the guest runs exactly once (every other QEMU of the VM is gone),
its heartbeat goes on, its memory check is intact, both hosts agree on the migration's final
state (completed on the source exactly when committed on the destination) and both audit
chains verify. Each case's outcome (completed or rolled back) is recorded in
``fault-matrix.json`` next to the cluster.

Phases: ``prepare`` and ``handshake`` (the source's phase events), ``transfer`` (a few MiB sent),
``postcopy`` (just after the switch), ``commit`` (the destination agent is frozen with SIGSTOP
while QEMU finishes, so the commit is sent and unanswered), ``after-commit`` (the destination
already runs the guest).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from trustmig.agent.client import ControlClient, ControlError
from trustmig.agent.local_cluster import LocalCluster

from .helpers import pid_alive

pytestmark = pytest.mark.vm

HOSTS = ("host-a", "host-b")
PHASES = ("prepare", "handshake", "transfer", "postcopy", "commit", "after-commit")
VICTIMS = ("source", "destination", "both")
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
TERMINAL = ("completed", "rolled-back", "refused", "failed")
MIGRATION_SETTINGS = (
    "[migration]\npeer_grace_s = 40\norphan_timeout_s = 90\ndoubt_report_s = 30\n"
    "commit_timeout_s = 20\n[admission]\nmax_per_vm_per_hour = 1000\n"
)
RESULTS: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, guest_image: Any) -> Any:
    root = tmp_path_factory.mktemp("faults")
    c = LocalCluster(root / "cluster", HOSTS)
    c.setup(extra_config={h: MIGRATION_SETTINGS for h in HOSTS})
    c.add_user("alice", ["owner", "operator"], tenant="acme")
    c.add_user("sam", ["security-admin", "auditor"])
    c.start_agents()

    async def boot() -> None:
        a = await c.client("host-a", "alice")
        try:
            params = {
                "spec": {"name": "vm1", "memory_mib": 256, "tenant": "acme",
                         "workload": {"mem_mib": 96, "dirty_rate": 4}},
                "policy": c.signed_policy("alice", "vm1", max_per_hour=1000),
            }  # fmt: skip
            await a.call("vm.start", params, timeout=300)
        finally:
            await a.close()

    asyncio.run(boot())
    yield c
    (root / "fault-matrix.json").write_text(json.dumps(RESULTS, indent=1))
    c.stop()


async def _client(c: LocalCluster, host: str, user: str = "alice") -> ControlClient:
    for _ in range(100):
        try:
            return await c.client(host, user)
        except ControlError:
            await asyncio.sleep(0.2)
    raise AssertionError(f"agent {host} unreachable")


async def _where(c: LocalCluster) -> tuple[str, str]:
    """(host where vm1 runs, the other host)."""
    for h in HOSTS:
        cl = await _client(c, h)
        try:
            vms = {v["name"]: v for v in (await cl.call("vm.list"))["vms"]}
        finally:
            await cl.close()
        if vms.get("vm1", {}).get("qemu_state") == "running":
            return h, next(o for o in HOSTS if o != h)
    raise AssertionError("vm1 runs nowhere")


def _victims(victim: str, src: str, dst: str) -> list[str]:
    return {"source": [src], "destination": [dst], "both": [src, dst]}[victim]


def _kill(c: LocalCluster, hosts: list[str], sig: int) -> None:
    for h in hosts:
        hh = c.hosts[h]
        assert hh.ref is not None
        hh.ref.signal(sig)
        if sig == signal.SIGTERM:
            hh.ref.signal(signal.SIGCONT)  # a frozen agent handles SIGTERM once it runs again
    for h in hosts:
        c.kill_agent(h, sig)


def _restart(c: LocalCluster, hosts: list[str]) -> None:
    for h in hosts:
        if not c.hosts[h].running():
            c.start_agent(h)


def _agent_pid(c: LocalCluster, host: str) -> int:
    ref = c.hosts[host].ref
    assert ref is not None
    return ref.pid


async def _poll(fn: Any, timeout: float, step: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = await fn()
        if v:
            return v
        await asyncio.sleep(step)
    return None


async def _migration_state(c: LocalCluster, host: str, mid: str) -> str | None:
    cl = await _client(c, host)
    try:
        return str((await cl.call("migration.show", {"migration_id": mid}))["state"])
    except ControlError as e:
        if e.code == "not_found":
            return None
        raise
    finally:
        await cl.close()


async def _qemu_pids(c: LocalCluster) -> set[int]:
    pids: set[int] = set()
    for h in HOSTS:
        with _suppress():
            cl = await c.client(h, "alice")
            try:
                st = await cl.call("host.status", timeout=5)
                pids |= {v["pid"] for v in st["vms"] if v.get("pid")}
                pids |= {i["pid"] for i in st["incoming"] if i.get("pid")}
            finally:
                await cl.close()
    return pids


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], ControlError | OSError)  # type: ignore[arg-type]


async def _run_case(c: LocalCluster, victim: str, sig: int, phase: str) -> dict[str, Any]:
    src, dst = await _where(c)
    killed = _victims(victim, src, dst)
    opts: dict[str, Any] = {"mode": "postcopy" if phase == "postcopy" else "precopy",
                            "max_bandwidth_mibps": 48, "postcopy_after_rounds": 1}  # fmt: skip
    state: dict[str, Any] = {"mid": None, "firing": False, "fired": False, "pids": set()}
    loop = asyncio.get_running_loop()

    async def fire() -> None:
        if state["firing"]:
            return
        state["firing"] = True
        state["pids"] |= await _qemu_pids(c)
        await loop.run_in_executor(None, _kill, c, killed, sig)
        # started again at once, as a supervisor (systemd) would
        await loop.run_in_executor(None, _restart, c, killed)
        state["fired"] = True

    async def on_event(ev: dict[str, Any]) -> None:
        state["mid"] = state["mid"] or ev.get("migration_id")
        p = ev.get("phase")
        if phase in ("prepare", "handshake") and p == phase:
            await fire()
        elif phase == "transfer" and ev.get("event") == "progress":
            if int(ev.get("transferred", 0)) > 8 * 1024 * 1024:
                await fire()
        elif phase == "postcopy" and p == "postcopy":
            await asyncio.sleep(0.3)
            await fire()
        elif (
            phase in ("commit", "after-commit")
            and ev.get("event") == "progress"
            and int(ev.get("transferred", 0)) > 4 * 1024 * 1024
            and not state.get("armed")
        ):
            # the data path runs on its own from here: the destination agent can be frozen
            state["armed"] = True
            state["arm"] = asyncio.ensure_future(_arm_commit(c, phase, src, dst, state, fire))

    cl = await _client(c, src)
    try:
        res = await cl.call("migrate", {"vm": "vm1", "to": dst, "options": opts},
                            on_event=on_event, timeout=600)  # fmt: skip
        outcome_seen = res.get("status")
    except ControlError as e:
        outcome_seen = f"error: {e}"
    finally:
        await cl.close()

    async def fired() -> bool:
        return bool(state["fired"])

    await _poll(fired, 60)
    _restart(c, killed)
    mid = state["mid"]
    assert mid, f"the migration never started: {outcome_seen}"
    return {"src": src, "dst": dst, "mid": mid, "fired": state["fired"], "seen": outcome_seen,
            "pids": state["pids"]}  # fmt: skip


async def _arm_commit(
    c: LocalCluster, phase: str, src: str, dst: str, state: dict[str, Any], fire: Any
) -> None:
    if phase == "commit":
        # freeze the destination agent: its relay and QEMU go on, its answer to the commit won't
        os.kill(_agent_pid(c, dst), signal.SIGSTOP)
        try:
            await _poll(lambda: _is(c, src, state["mid"], "committing"), 120, 0.1)
        finally:
            await fire()
            if c.hosts[dst].running():
                os.kill(_agent_pid(c, dst), signal.SIGCONT)
    else:
        await _poll(lambda: _runs_on(c, dst), 120, 0.02)
        await fire()


async def _is(c: LocalCluster, host: str, mid: str | None, want: str) -> bool:
    return bool(mid) and await _migration_state(c, host, str(mid)) == want


async def _runs_on(c: LocalCluster, host: str) -> bool:
    with _suppress():
        cl = await c.client(host, "alice")
        try:
            vms = {v["name"]: v for v in (await cl.call("vm.list", timeout=5))["vms"]}
            return vms.get("vm1", {}).get("qemu_state") == "running" and not vms["vm1"].get(
                "migration"
            )
        finally:
            await cl.close()
    return False


async def _settle(c: LocalCluster, case: dict[str, Any]) -> dict[str, Any]:
    src, dst, mid = case["src"], case["dst"], case["mid"]

    async def done() -> tuple[str | None, str | None] | None:
        s = await _migration_state(c, src, mid)
        d = await _migration_state(c, dst, mid)
        if s in TERMINAL and d in ("committed", "aborted", None):
            return s, d
        return None

    settled = await _poll(done, 240, 0.5)
    assert settled, (
        f"migration {mid} did not settle: source {await _migration_state(c, src, mid)}, "
        f"destination {await _migration_state(c, dst, mid)}"
    )
    return {"source_state": settled[0], "destination_state": settled[1]}


async def _check_guest(c: LocalCluster, case: dict[str, Any], states: dict[str, Any]) -> str:
    owner, other = await _where(c)
    completed = states["source_state"] == "completed"
    assert completed == (states["destination_state"] == "committed"), states
    assert owner == (case["dst"] if completed else case["src"]), (owner, states)
    o = await _client(c, owner)
    x = await _client(c, other)
    try:
        others = [v for v in (await x.call("vm.list"))["vms"] if v["name"] == "vm1"]
        assert not others, f"vm1 also known on {other}: {others}"
        vm = next(v for v in (await o.call("vm.list"))["vms"] if v["name"] == "vm1")
        # heartbeat continues, memory intact
        n0 = len((await o.call("vm.heartbeats", {"name": "vm1"}))["heartbeats"])
        await asyncio.sleep(1.0)
        n1 = len((await o.call("vm.heartbeats", {"name": "vm1"}))["heartbeats"])
        assert n1 > n0 + 10, f"heartbeat stalled on {owner}: {n0} -> {n1}"
        check = await o.call("vm.check", {"name": "vm1"}, timeout=120)
        assert check["bad_pages"] == 0 and check["marker_ok"] == check["marker_total"], check
    finally:
        await o.close()
        await x.close()
    # exactly one QEMU of the VM runs: every other one seen during the case is gone
    for pid in case["pids"] | await _qemu_pids(c):
        if pid != vm["pid"]:
            for _ in range(100):
                if not pid_alive(pid):
                    break
                await asyncio.sleep(0.1)
            assert not pid_alive(pid), f"a second QEMU {pid} of vm1 still runs"
    # both audit chains verify
    for h in HOSTS:
        a = await _client(c, h, "sam")
        try:
            rep = await a.call("audit.verify", timeout=60)
            assert rep["ok"], rep
        finally:
            await a.close()
    return "completed" if completed else "rolled back"


CASES = [(v, s, p) for p in PHASES for v in VICTIMS for s in SIGNALS]


IDS = [f"{p}-{v}-{s}" for v, s, p in CASES]


@pytest.mark.parametrize(("victim", "sig", "phase"), CASES, ids=IDS)
def test_agent_killed(cluster: LocalCluster, victim: str, sig: str, phase: str) -> None:
    async def go() -> tuple[dict[str, Any], str]:
        case = await _run_case(cluster, victim, SIGNALS[sig], phase)
        states = await _settle(cluster, case)
        outcome = await _check_guest(cluster, case, states)
        return {**states, "fired": case["fired"]}, outcome

    t0 = time.monotonic()
    states, outcome = asyncio.run(go())
    RESULTS[f"{phase}/{victim}/{sig}"] = {**states, "outcome": outcome,
                                          "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip
    assert states["fired"], "the kill never happened (phase not reached)"


def test_guest_outlives_kill_9_of_its_agent_and_is_adopted_again(cluster: LocalCluster) -> None:
    async def go() -> None:
        owner, _ = await _where(cluster)
        cl = await _client(cluster, owner)
        pid = next(v for v in (await cl.call("vm.list"))["vms"] if v["name"] == "vm1")["pid"]
        await cl.close()
        cluster.kill_agent(owner, signal.SIGKILL)
        await asyncio.sleep(1.0)
        assert pid_alive(pid), "the guest died with its agent"
        cluster.start_agent(owner)
        cl = await _client(cluster, owner)
        try:
            vm = next(v for v in (await cl.call("vm.list"))["vms"] if v["name"] == "vm1")
            assert vm["pid"] == pid and vm["qemu_state"] == "running"
            hb = await cl.call("vm.heartbeats", {"name": "vm1"})
            await asyncio.sleep(0.5)
            hb2 = await cl.call("vm.heartbeats", {"name": "vm1"})
            assert len(hb2["heartbeats"]) > len(hb["heartbeats"])
        finally:
            await cl.close()

    asyncio.run(go())


def test_two_migrate_requests_at_once_one_is_refused_busy(cluster: LocalCluster) -> None:
    async def go() -> list[Any]:
        src, dst = await _where(cluster)
        a, b = await _client(cluster, src), await _client(cluster, src)
        try:
            opts = {"mode": "precopy"}
            return await asyncio.gather(
                a.call("migrate", {"vm": "vm1", "to": dst, "options": opts}, timeout=300),
                b.call("migrate", {"vm": "vm1", "to": dst, "options": opts}, timeout=300),
                return_exceptions=True,
            )
        finally:
            await a.close()
            await b.close()

    results = asyncio.run(go())
    ok = [r for r in results if isinstance(r, dict)]
    errors = [r for r in results if isinstance(r, ControlError)]
    assert len(ok) == 1 and ok[0]["status"] == "completed", results
    assert len(errors) == 1 and errors[0].code == "busy", results


def test_stopped_guest_after_readoption(cluster: LocalCluster, tmp_path: Path) -> None:
    """'trustmig vm stop' works on a re-adopted guest, and nothing of it is left."""

    async def go() -> None:
        owner, _ = await _where(cluster)
        cl = await _client(cluster, owner)
        pid = next(v for v in (await cl.call("vm.list"))["vms"] if v["name"] == "vm1")["pid"]
        await cl.close()
        cluster.kill_agent(owner, signal.SIGTERM)
        assert pid_alive(pid), "SIGTERM of the agent must leave its guests running"
        cluster.start_agent(owner)
        cl = await _client(cluster, owner)
        try:
            await cl.call("vm.stop", {"name": "vm1"})
            assert not [v for v in (await cl.call("vm.list"))["vms"] if v["name"] == "vm1"]
        finally:
            await cl.close()
        assert not pid_alive(pid)

    asyncio.run(go())
