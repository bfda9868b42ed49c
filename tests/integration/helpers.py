"""Steps shared by the VM integration tests."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from trustmig.agent.client import ControlClient, ControlError
from trustmig.agent.governance import audit_url
from trustmig.agent.local_cluster import LocalCluster
from trustmig.audit import AuditLog


def spec(
    name: str = "vm1", memory: int = 256, workload: int = 64, rate: float = 0.0
) -> dict[str, Any]:
    return {
        "name": name,
        "memory_mib": memory,
        "tenant": "acme",
        "workload": {"mem_mib": workload, "dirty_rate": rate},
    }


async def start_vm(
    c: ControlClient, s: dict[str, Any], cluster: LocalCluster | None = None, **policy: Any
) -> dict[str, Any]:
    """Boot a VM; with ``cluster``, provision the owner's signed policy with it."""
    params: dict[str, Any] = {"spec": s}
    if cluster is not None:
        params["policy"] = cluster.signed_policy("alice", s["name"], **policy)
    return await c.call("vm.start", params, timeout=300)


async def heartbeat_count(c: ControlClient, vm: str) -> int:
    return len((await c.call("vm.heartbeats", {"name": vm}))["heartbeats"])


async def assert_running_and_beating(c: ControlClient, vm: str) -> None:
    """The guest is in QEMU state 'running' and its heartbeat advances."""
    vms = {v["name"]: v for v in (await c.call("vm.list"))["vms"]}
    assert vm in vms, f"{vm} not on this host: {list(vms)}"
    assert vms[vm]["qemu_state"] == "running", vms[vm]
    n0 = await heartbeat_count(c, vm)
    await asyncio.sleep(0.5)
    n1 = await heartbeat_count(c, vm)
    assert n1 > n0 + 5, f"heartbeat stalled: {n0} -> {n1}"


async def assert_absent(c: ControlClient, vm: str) -> None:
    vms = [v["name"] for v in (await c.call("vm.list"))["vms"]]
    assert vm not in vms


async def incoming_pids(c: ControlClient) -> list[int]:
    st = await c.call("host.status")
    return [i["pid"] for i in st.get("incoming", []) if i.get("pid")]


async def migrate_with_hook(
    cluster: LocalCluster,
    src: ControlClient,
    vm: str,
    to: str,
    options: dict[str, Any],
    *,
    when_bytes: int | None = None,
    hook: Any = None,
    on: str = "progress",
) -> tuple[dict[str, Any] | None, str | None]:
    """Start a migration; once ``when_bytes`` were transferred (events named ``on``: memory
    ``progress``, or ``disk-progress``) call ``hook()``.

    Returns (result, error line)."""
    fired = False

    async def on_event(ev: dict[str, Any]) -> None:
        nonlocal fired
        if (
            hook is not None
            and not fired
            and ev.get("event") == on
            and int(ev.get("transferred", 0)) >= (when_bytes or 0)
        ):
            fired = True
            r = hook()
            if asyncio.iscoroutine(r):
                await r

    try:
        res = await src.call(
            "migrate", {"vm": vm, "to": to, "options": options}, on_event=on_event, timeout=300
        )
        return res, None
    except ControlError as e:
        return None, str(e)


def wait_until(pred: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def arun(coro: Any) -> Any:
    return asyncio.run(coro)


def pid_alive(pid: int | None) -> bool:
    """True if the process exists and is not a zombie (a zombie is not a running copy)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def audit_events(cluster: LocalCluster, host: str, kind: str) -> list[Any]:
    """``host``'s audit events of ``kind``, read from its database as an auditor would."""
    log = AuditLog(audit_url(cluster.hosts[host].dir), host=host, signing_key=None)
    try:
        return list(log.events(kind=kind))
    finally:
        log.close()
