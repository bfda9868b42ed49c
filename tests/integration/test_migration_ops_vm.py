"""Operating migrations: one left in doubt is shown and settled, a full disk does not lie about
a migration that completed, and a destination agent that never comes back is rolled back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from trustmig.agent.client import ControlError

from .helpers import arun, assert_absent, assert_running_and_beating, pid_alive, spec, start_vm

pytestmark = pytest.mark.vm

DOUBT = "[migration]\npeer_grace_s = 8\ndoubt_report_s = 4\ncommit_timeout_s = 3\n"


async def _wait_state(c: Any, host: str, mid: str, want: str, timeout: float = 60) -> str:
    end = time.monotonic() + timeout
    st = ""
    while time.monotonic() < end:
        cl = await c.client(host, "alice")
        try:
            st = (await cl.call("migration.show", {"migration_id": mid}))["state"]
        finally:
            await cl.close()
        if st == want:
            return st
        await asyncio.sleep(0.1)
    return st


def test_commit_in_doubt_is_reported_shown_and_resolved(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(extra_config={"host-a": DOUBT, "host-b": DOUBT})
    cluster.add_user("olga", ["owner"], tenant="acme")
    dst_pid = cluster.hosts["host-b"].pid

    async def go() -> dict[str, Any]:
        src = await cluster.client("host-a", "alice")
        mid: list[str] = []

        async def on_event(ev: dict[str, Any]) -> None:
            if ev.get("phase") == "transfer":
                mid.append(ev["migration_id"])
                os.kill(dst_pid, signal.SIGSTOP)  # the destination agent hangs; its data path not

        try:
            await start_vm(src, spec(), cluster)
            with pytest.raises(ControlError) as err:
                await src.call(
                    "migrate",
                    {"vm": "vm1", "to": "host-b", "options": {"max_bandwidth_mibps": 64}},
                    on_event=on_event,
                    timeout=300,
                )
            assert err.value.code == "in_doubt", err.value
            assert "in doubt" in str(err.value) and "migration resolve" in str(err.value)
            shown = await src.call("migration.show", {"migration_id": mid[0]})
            assert shown["state"] == "committing"
            vm = next(v for v in (await src.call("vm.list"))["vms"] if v["name"] == "vm1")
            assert vm["qemu_state"] != "running", "an in-doubt source guest stays paused"
            with pytest.raises(ControlError) as resume:
                await src.call("vm.resume", {"name": "vm1"})
            assert resume.value.code == "in_doubt"
            olga = await cluster.client("host-a", "olga")
            with pytest.raises(ControlError) as denied:
                await olga.call("migration.resolve", {"migration_id": mid[0], "keep": "retry"})
            await olga.close()
            assert denied.value.code == "denied"
            os.kill(dst_pid, signal.SIGCONT)
            await src.call("migration.resolve", {"migration_id": mid[0], "keep": "retry"})
            assert await _wait_state(cluster, "host-a", mid[0], "completed") == "completed"
            with pytest.raises(ControlError) as late:
                await src.call("migration.resolve", {"migration_id": mid[0], "keep": "source"})
            assert late.value.code == "invalid"
            listed = await src.call("migration.list")
            return {"mid": mid[0], "listed": listed}
        finally:
            with_cont(dst_pid)
            await src.close()

    out = arun(go())
    assert any(m["migration_id"] == out["mid"] and m["state"] == "completed"
               for m in out["listed"]["migrations"])  # fmt: skip

    async def after() -> None:
        dst = await cluster.client("host-b", "alice")
        src = await cluster.client("host-a", "alice")
        try:
            await assert_running_and_beating(dst, "vm1")
            await assert_absent(src, "vm1")
            events = (await dst.call("migration.show", {"migration_id": out["mid"]}))["state"]
            assert events == "committed"
        finally:
            await dst.close()
            await src.close()

    arun(after())


def with_cont(pid: int | None) -> None:
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGCONT)


def test_destination_agent_that_never_returns_rolls_the_precopy_back(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(extra_config={"host-a": DOUBT, "host-b": DOUBT})

    async def go() -> tuple[str, list[int]]:
        src = await cluster.client("host-a", "alice")
        dst = await cluster.client("host-b", "alice")
        pids: list[int] = []

        async def on_event(ev: dict[str, Any]) -> None:
            if ev.get("event") == "progress" and not pids:
                pids.extend(i["pid"] for i in (await dst.call("host.status"))["incoming"])
                cluster.kill_agent("host-b", signal.SIGKILL)

        try:
            await start_vm(src, spec(memory=320, workload=160, rate=4), cluster)
            with pytest.raises(ControlError) as err:
                await src.call(
                    "migrate",
                    {"vm": "vm1", "to": "host-b", "options": {"max_bandwidth_mibps": 24}},
                    on_event=on_event,
                    timeout=300,
                )
            await assert_running_and_beating(src, "vm1")
            check = await src.call("vm.check", {"name": "vm1"})
            assert check["bad_pages"] == 0
            return str(err.value), pids
        finally:
            await src.close()

    err, pids = arun(go())
    assert "unreachable" in err
    assert pids
    # the incoming QEMU never ran; once the destination agent is back it discards it
    cluster.start_agent("host-b")
    for _ in range(200):
        if not any(pid_alive(p) for p in pids):
            break
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids), "the destination kept a discarded incoming guest"


def test_source_disk_full_after_the_switch_still_reports_completed(
    make_cluster, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The source's state directory fills up once QEMU sends the memory: the journal and the audit
    trail cannot be written, yet the migration that completed is reported completed (with
    warnings) and the guest runs once, on the destination."""
    cluster = make_cluster(defer_start=True)
    state = cluster.hosts["host-a"].dir
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], check=True)
    try:
        subprocess.run(["cp", "-a", f"{state}/.", str(mnt)], check=True)
        subprocess.run(["mount", "--bind", str(mnt), str(state)], check=True)
        try:
            _migrate_while_filling(cluster, state)
        finally:
            cluster.stop()
            subprocess.run(["umount", str(state)], check=False)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _migrate_while_filling(cluster: Any, state: Path) -> None:
    cluster.start_agents()

    async def go() -> dict[str, Any]:
        src = await cluster.client("host-a", "alice")
        dst = await cluster.client("host-b", "alice")
        filled: list[bool] = []

        async def on_event(ev: dict[str, Any]) -> None:
            # once QEMU sends (before it, a journal that cannot record the start refuses it)
            if ev.get("event") == "progress" and ev.get("transferred", 0) > 0 and not filled:
                filled.append(True)
                subprocess.run(["dd", "if=/dev/zero", f"of={state}/filler", "bs=1M"],
                               capture_output=True, check=False)  # fmt: skip

        try:
            await start_vm(src, spec(), cluster)
            res = await src.call(
                "migrate",
                {"vm": "vm1", "to": "host-b", "options": {"max_bandwidth_mibps": 64}},
                on_event=on_event,
                timeout=300,
            )
            await assert_running_and_beating(dst, "vm1")
            await assert_absent(src, "vm1")
            return res
        finally:
            await src.close()
            await dst.close()

    res = arun(go())
    assert res["status"] == "completed"
    assert any("full" in w or "write failed" in w for w in res["warnings"]), res["warnings"]


def test_guest_that_died_while_its_agent_was_down_is_reported_crashed(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster()
    cluster.add_user("sam", ["auditor"])

    async def start() -> int:
        c = await cluster.client("host-a", "alice")
        try:
            return int((await start_vm(c, spec(), cluster))["pid"])
        finally:
            await c.close()

    pid = arun(start())
    cluster.kill_agent("host-a", signal.SIGKILL)
    assert pid_alive(pid)
    os.kill(pid, signal.SIGKILL)
    cluster.start_agent("host-a")

    async def look() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        c = await cluster.client("host-a", "alice")
        s = await cluster.client("host-a", "sam")
        try:
            vm = next(v for v in (await c.call("vm.list"))["vms"] if v["name"] == "vm1")
            events = (await s.call("audit.show", {"vm": "vm1"}))["events"]
            # the name can be used again: a crashed guest is no running copy
            await start_vm(c, spec(), cluster)
            return vm, events
        finally:
            await c.close()
            await s.close()

    vm, events = arun(look())
    assert vm["state"] == "crashed" and vm["qemu_state"] == "absent"
    assert "while the agent was down" in vm["error"]
    assert any(e["kind"] == "vm.crashed" for e in events)
