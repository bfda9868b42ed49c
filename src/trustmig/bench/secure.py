"""trustmig's own path: the guest migrates between two real agent processes.

The migration is requested exactly as an operator would (``migrate`` on the source agent, as a
user with the owner and operator roles), so the figures include everything the product does:
policy, preparing the destination, the attested handshake, the encrypted relay and the commit.
CPU is counted for QEMU, the agent *and* its migration relay on each side, because the relay is
where encryption runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from trustmig.agent.client import ControlClient, ControlError
from trustmig.agent.local_cluster import LocalCluster
from trustmig.bench.cpu import CpuMeter
from trustmig.bench.errors import BenchError
from trustmig.bench.record import finish_record, heartbeat_record, integrity_record, new_record
from trustmig.bench.stats import per_gib
from trustmig.hypervisor.migration import MigrationOptions, MigrationProgress
from trustmig.hypervisor.spec import VMSpec

SOURCE, DEST = "host-a", "host-b"
USER = "bench"
USER_ROLES = ["owner", "operator"]
TENANT = "bench"
BOOT_TIMEOUT_S = 300.0
CHECK_TIMEOUT_S = 180.0


def _progress_of(res: dict[str, Any]) -> MigrationProgress:
    """The agent's result, seen as QEMU's final ``query-migrate`` (which it was built from)."""
    return MigrationProgress(
        status=str(res.get("status", "completed")),
        transferred=int(res.get("bytes_transferred") or 0),
        remaining=0,
        total=int(res.get("ram_total") or 0),
        dirty_rate_pps=0,
        rounds=int(res.get("rounds") or 0),
        expected_downtime_ms=None,
        mbps=0.0,
        total_ms=res.get("total_ms"),
        downtime_ms=res.get("downtime_ms"),
        setup_ms=res.get("setup_ms"),
        postcopy_requests=int(res.get("postcopy_requests") or 0),
        error=None,
    )


def vm_policy(cluster: LocalCluster, vm: str) -> str:
    """The VM policy the owner signs: this user may migrate the guest, as often as it likes.

    A benchmark migrates the same guest name many times an hour, so the rate limit is lifted
    (``max_per_hour`` very high); everything else is the cluster's ordinary policy.
    """
    return cluster.signed_policy(USER, vm, tenant=TENANT, max_per_hour=1_000_000)


async def _incoming_qemu_pid(dst: ControlClient) -> int | None:
    st = await dst.call("host.status", timeout=10)
    pids = [i["pid"] for i in st.get("incoming", []) if i.get("pid")]
    return int(pids[-1]) if pids else None


async def _destination_relay_cpu(dst: ControlClient, migration_id: str) -> float | None:
    """What the destination's relays spent on the migration's data, once it has closed them
    (just after the commit); None if the destination never says."""
    for _ in range(50):
        with contextlib.suppress(ControlError, OSError, TimeoutError):
            row = await dst.call("migration.show", {"migration_id": migration_id}, timeout=10)
            if row.get("relay_cpu_s_data") is not None:
                return float(row["relay_cpu_s_data"])
        await asyncio.sleep(0.1)
    return None


async def _stop_everywhere(clients: tuple[ControlClient, ...], name: str) -> None:
    for c in clients:
        with contextlib.suppress(ControlError, OSError, TimeoutError):
            await c.call("vm.stop", {"name": name}, timeout=30)


async def run_secure(
    cluster: LocalCluster, spec: VMSpec, opts: MigrationOptions, *, channel: str = "secure",
    helpers: tuple[tuple[int, ...], tuple[int, ...]] = ((), ()),
) -> dict[str, Any]:  # fmt: skip
    """One migration through the agents of ``cluster``; returns the run's record. ``helpers``
    are processes whose CPU counts for the source and destination sides (IPsec daemons).

    The guest is stopped on both hosts afterwards whatever happened.
    """
    rec = new_record(channel, spec, opts.mode)
    src_agent, dst_agent = cluster.hosts[SOURCE].pid, cluster.hosts[DEST].pid
    src = await cluster.client(SOURCE, USER)
    dst = await cluster.client(DEST, USER)
    name = spec.name
    try:
        await src.call(
            "vm.start",
            {"spec": spec.model_dump(mode="json", exclude={"image_key", "owner"}),
             "policy": vm_policy(cluster, name), "boot_timeout": BOOT_TIMEOUT_S},
            timeout=BOOT_TIMEOUT_S + 60,
        )  # fmt: skip
        before = await src.call("vm.check", {"name": name}, timeout=CHECK_TIMEOUT_S)
        # The source QEMU exits at the end and each side's relay exits with its migration, so
        # their CPU is what the source agent read of its QEMU and what each relay reported of
        # its own; the agents and the destination QEMU are read from /proc.
        cpu_src = CpuMeter().start(src_agent, *helpers[0])
        cpu_dst = CpuMeter().start(dst_agent, *helpers[1])
        dst_pid_task: asyncio.Task[int | None] | None = None

        def on_event(ev: dict[str, Any]) -> None:
            # The destination QEMU exists once the handshake starts (prepare has returned):
            # take its CPU baseline then, before it receives a byte.
            nonlocal dst_pid_task
            if ev.get("phase") == "handshake" and dst_pid_task is None:
                dst_pid_task = asyncio.ensure_future(_incoming_qemu_pid(dst))
                dst_pid_task.add_done_callback(
                    lambda t: (
                        cpu_dst.add(t.result())
                        if not t.cancelled() and t.exception() is None
                        else None
                    )
                )

        t0, t_wall = time.monotonic(), time.time()
        try:
            res = await src.call(
                "migrate",
                {"vm": name, "to": DEST, "options": opts.model_dump(mode="json")},
                on_event=on_event,
                timeout=opts.timeout_s + 120,
            )
        except ControlError as e:
            raise BenchError(f"secure migration failed: {e}") from None
        wall_ms = (time.monotonic() - t0) * 1000
        if dst_pid_task is not None:
            with contextlib.suppress(Exception):
                await dst_pid_task
        if res.get("destination_pid") and int(res["destination_pid"]) not in cpu_dst.baseline:
            cpu_dst.baseline[int(res["destination_pid"])] = 0.0  # started for this migration
        cpu_src.stop()
        cpu_dst.stop()
        cpu_src.extra += float(res.get("cpu_s_source") or 0.0)
        relay_src, relay_dst = None, None
        if opts.channel != "qemu-tls":  # QEMU's own TLS runs without relays
            relay_src = res.get("cpu_s_relay_data")
            relay_dst = await _destination_relay_cpu(dst, str(res.get("migration_id") or ""))
            if relay_src is None or relay_dst is None:
                raise BenchError(
                    "a relay did not report its CPU: the run's CPU would be undercounted"
                )
        cpu_src.extra += float(relay_src or 0.0)
        cpu_dst.extra += float(relay_dst or 0.0)
        rec["cpu_s_relay_source"] = relay_src
        rec["cpu_s_relay_destination"] = relay_dst
        records = int(res.get("relay_records_out") or 0)
        rec["mean_record_bytes"] = (
            round(int(res.get("bytes_transferred") or 0) / records) if records else None
        )
        rec["cpu_s_agent_source"] = cpu_src.of(src_agent)
        rec["cpu_s_agent_destination"] = cpu_dst.of(dst_agent)
        after = await dst.call("vm.check", {"name": name}, timeout=CHECK_TIMEOUT_S)
        rec.update(integrity_record(before, after, spec.needs_workload.dirty_rate))
        beats = await dst.call("vm.heartbeats", {"name": name, "since": t_wall - 2.0})
        rec.update(heartbeat_record([tuple(h) for h in res.get("source_heartbeats") or []],
                                    [tuple(h) for h in beats["heartbeats"]]))  # fmt: skip
        finish_record(
            rec,
            _progress_of(res),
            wall_ms=wall_ms,
            cpu_s_source=cpu_src.seconds,
            cpu_s_destination=cpu_dst.seconds,
            mode_used=str(res.get("mode") or opts.mode),
        )
        moved = int(rec.get("bytes_transferred") or 0)
        for part in ("relay_source", "relay_destination", "agent_source", "agent_destination"):
            spent = rec.get(f"cpu_s_{part}")
            rec[f"cpu_s_per_gib_{part}"] = None if spent is None else per_gib(spent, moved)
        rec["handshake_ms"] = res.get("handshake_ms")
        rec["time_to_first_byte_ms"] = res.get("time_to_first_byte_ms")
        rec["attestation"] = res.get("attestation")
        rec["handover_ms"] = res.get("handover_ms")
    except Exception as e:  # a failed run is a result, reported per run
        rec["status"] = "failed"
        rec["error"] = (str(e).splitlines() or [type(e).__name__])[0]
    finally:
        await _stop_everywhere((dst, src), name)
        await src.close()
        await dst.close()
    return rec
