"""Runtime memory measurement: the guest kernel's code is measured on the source once it stopped
and on the destination before it runs; a change in between aborts the migration with the guest
intact on the source."""

from __future__ import annotations

from typing import Any

import pytest

from trustmig.agent.client import ControlError
from trustmig.hypervisor.image import build_image
from trustmig.hypervisor.measure import kernel_text_region

from .helpers import arun, assert_running_and_beating, migrate_with_hook, spec, start_vm

pytestmark = pytest.mark.vm


def _measured_spec() -> dict[str, Any]:
    region = kernel_text_region(build_image().kernel)
    return {**spec(memory=256, workload=64), "measure": [region.model_dump()]}


def test_kernel_code_is_measured_on_both_ends(make_cluster: Any) -> None:
    cluster = make_cluster()

    async def go() -> tuple[dict[str, Any], str]:
        a = await cluster.client("host-a", "alice")
        b = await cluster.client("host-b", "alice")
        try:
            await start_vm(a, _measured_spec(), cluster)
            with pytest.raises(ControlError) as post:
                await a.call("migrate", {"vm": "vm1", "to": "host-b",
                                         "options": {"mode": "postcopy"}})  # fmt: skip
            res = await a.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}},
                               timeout=300)  # fmt: skip
            await assert_running_and_beating(b, "vm1")
            return res, str(post.value)
        finally:
            await a.close()
            await b.close()

    res, post = arun(go())
    assert "measured memory regions, which need a pre-copy migration" in post
    m = res["runtime_measurement"]
    assert m["match"] is True and m["regions"] == ["kernel-text"] and m["differ"] == []
    assert len(m["source"]["kernel-text"]) == 64
    assert m["source_ms"] > 0 and m["destination_ms"] > 0


def _guest_ram(pid: int, memory_mib: int) -> int:
    """Where QEMU maps the guest's RAM in its own address space (an anonymous mapping of the
    guest's size): what an intruder with root on the destination host writes into."""
    want = memory_mib * 1024 * 1024
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if fields[1].startswith("rw") and len(fields) == 5 and hi - lo >= want:
                return lo
    raise AssertionError(f"no guest RAM mapping in QEMU {pid}")


def test_kernel_code_changed_on_the_destination_aborts_the_migration(make_cluster: Any) -> None:
    cluster = make_cluster()
    definition = _measured_spec()
    text = definition["measure"][0]

    async def tamper() -> None:
        """An intruder with root on host-b patches the arrived kernel code in QEMU's memory."""
        b = await cluster.client("host-b", "alice")
        try:
            pid = next(i["pid"] for i in (await b.call("host.status"))["incoming"] if i["pid"])
        finally:
            await b.close()
        ram = _guest_ram(pid, definition["memory_mib"])
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(ram + text["gpa"] + 0x1000)
            mem.write(b"\xcc" * 16)

    async def go() -> tuple[dict[str, Any] | None, str | None]:
        a = await cluster.client("host-a", "alice")
        try:
            await start_vm(a, definition, cluster)
            res, err = await migrate_with_hook(
                cluster, a, "vm1", "host-b", {"max_bandwidth_mibps": 16},
                when_bytes=48 * 1024 * 1024, hook=tamper,
            )  # fmt: skip
            await assert_running_and_beating(a, "vm1")
            check = await a.call("vm.check", {"name": "vm1"}, timeout=120)
            assert check["bad_pages"] == 0, check
            return res, err
        finally:
            await a.close()

    res, err = arun(go())
    assert res is None and err is not None
    assert "runtime measurement of kernel-text differs from the source's" in err, err
