"""The record of one benchmark run: the same fields for every channel.

Keeping one constructor for all channels is what makes their figures comparable: throughput is
always RAM bytes moved over QEMU's own total time, CPU is always divided by GiB moved, and every
record carries the destination guest's own memory check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trustmig.bench.stats import per_gib, throughput_mbps
from trustmig.hypervisor.console_protocol import CheckResult
from trustmig.hypervisor.heartbeat import analyse
from trustmig.hypervisor.migration import MigrationProgress
from trustmig.hypervisor.spec import VMSpec


def new_record(channel: str, spec: VMSpec, mode: str) -> dict[str, Any]:
    """A run that has not completed yet (and stays ``failed`` unless it does)."""
    return {
        "channel": channel,
        "mode": mode,
        "mode_used": None,
        "dirty_rate": spec.needs_workload.dirty_rate,
        "memory_mib": spec.memory_mib,
        "fill_mib": spec.needs_workload.mem_mib,
        "status": "failed",
        "error": None,
        "total_ms": None,
        "downtime_ms": None,
        "wall_ms": None,
        "bytes_transferred": None,
        "ram_total": None,
        "rounds": None,
        "throughput_mbps": None,
        "cpu_s_source": None,
        "cpu_s_destination": None,
        "cpu_s_per_gib_source": None,
        "cpu_s_per_gib_destination": None,
        "integrity": None,
        "integrity_ok": False,
        "heartbeat_gap_ms": None,
        "heartbeat_continuous": None,
    }


def _check_json(c: CheckResult | dict[str, Any]) -> dict[str, Any]:
    d = dict(c) if isinstance(c, dict) else dict(c.__dict__)
    d.pop("name", None)
    return d


def integrity_record(
    before: CheckResult | dict[str, Any], after: CheckResult | dict[str, Any], dirty_rate: float
) -> dict[str, Any]:
    """The destination guest's own memory check after the migration.

    Every patterned page must verify (``bad_pages == 0``) and every marker must be intact; for a
    guest that does not rewrite memory the digest must also equal the source's before migration.
    """
    b, a = _check_json(before), _check_json(after)
    ok = a["bad_pages"] == 0 and a["marker_ok"] == a["marker_total"]
    digest_same = a["digest"] == b["digest"]
    if dirty_rate == 0:
        ok = ok and digest_same
    return {
        "integrity": {"before": b, "after": a, "digest_unchanged": digest_same},
        "integrity_ok": ok,
    }


def heartbeat_record(
    source: Sequence[tuple[int, float]], destination: Sequence[tuple[int, float]]
) -> dict[str, Any]:
    """What the guest felt: the largest gap between consecutive heartbeats (host receive
    times, both consoles merged) and whether the sequence went on unbroken."""
    cont = analyse(source, destination)
    return {"heartbeat_gap_ms": cont.gap_ms, "heartbeat_continuous": cont.continuous,
            "heartbeat_detail": cont.reason}  # fmt: skip


def finish_record(
    rec: dict[str, Any],
    prog: MigrationProgress,
    *,
    wall_ms: float,
    cpu_s_source: float,
    cpu_s_destination: float,
    mode_used: str,
) -> None:
    """Fill in QEMU's figures and the derived ones; the run completes only if memory is intact."""
    moved = prog.transferred
    rec.update(
        {
            "mode_used": mode_used,
            "total_ms": prog.total_ms,
            "downtime_ms": prog.downtime_ms,
            "wall_ms": round(wall_ms, 1),
            "bytes_transferred": moved,
            "ram_total": prog.total,
            "rounds": prog.rounds,
            "throughput_mbps": throughput_mbps(moved, prog.total_ms),
            "cpu_s_source": round(cpu_s_source, 3),
            "cpu_s_destination": round(cpu_s_destination, 3),
            "cpu_s_per_gib_source": per_gib(cpu_s_source, moved),
            "cpu_s_per_gib_destination": per_gib(cpu_s_destination, moved),
        }
    )
    if prog.downtime_ms is not None and prog.total_ms and prog.downtime_ms > prog.total_ms:
        # QEMU 7.2 sometimes reports a post-copy downtime larger than the whole migration;
        # such a figure cannot be true, so it is kept aside rather than poisoning the medians.
        rec["downtime_ms"] = None
        rec["downtime_ms_reported"] = prog.downtime_ms
    gap, down = rec.get("heartbeat_gap_ms"), rec.get("downtime_ms")
    # the pause the guest felt beyond what QEMU itself counts: the handover's own cost, without
    # the run-to-run spread of QEMU's downtime (its convergence, not the handover)
    rec["gap_beyond_downtime_ms"] = (
        round(float(gap) - float(down), 1) if gap is not None and down is not None else None
    )
    if rec["integrity_ok"]:
        rec["status"] = "completed"
    else:
        rec["status"] = "failed"
        rec["error"] = "destination guest memory check failed (see integrity)"
