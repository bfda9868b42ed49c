"""The migration benchmark end to end on a tiny guest: every channel migrates real QEMUs.

Asserts outcomes only (every run completed, the destination guest's memory verified, ratios
exist), never how fast anything was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trustmig.bench import BenchConfig, run_migrate_bench

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed"),
]


def _qemu_children() -> set[int]:
    import os

    me = str(os.getpid())
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        comm = (stat.parent / "comm").read_text().strip() if (stat.parent / "comm").exists() else ""
        if fields[1] == me and comm.startswith("qemu"):
            pids.add(int(stat.parent.name))
    return pids


def test_tiny_benchmark_all_channels(tmp_path: Path, guest_image: object) -> None:
    cfg = BenchConfig(
        channels=("plain", "secure", "qemu-tls"),
        memory_mib=256,
        fill_mib=64,
        dirty_rates=(0.0,),
        repeat=1,
    )
    seen: list[tuple[int, int, str]] = []
    report = run_migrate_bench(
        cfg, workdir=tmp_path / "bench", on_progress=lambda d, t, lab: seen.append((d, t, lab))
    )
    json.dumps(report)  # the report is plain JSON

    assert set(report) >= {"config", "results", "by_dirty_rate", "ratios", "runs"}
    assert report["config"]["memory_mib"] == 256 and report["config"]["fill_mib"] == 64
    assert [r["channel"] for r in report["runs"]] == ["plain", "secure", "qemu-tls"]
    for run in report["runs"]:
        assert run["status"] == "completed", run
        assert run["integrity"]["after"]["bad_pages"] == 0, run
        assert run["integrity_ok"] is True
        assert run["bytes_transferred"] > 64 * 1024 * 1024
        assert run["throughput_mbps"] > 0
        assert run["cpu_s_per_gib_source"] is not None
        assert run["heartbeat_continuous"] is True and run["heartbeat_gap_ms"] > 0, run
    secure = report["runs"][1]
    assert secure["handshake_ms"] is not None and secure["time_to_first_byte_ms"] is not None
    # every process of a side counts, the relays (gone by the end) by their own report
    for side in ("source", "destination"):
        relay, agent = secure[f"cpu_s_relay_{side}"], secure[f"cpu_s_agent_{side}"]
        assert relay > 0 and agent is not None, secure
        assert secure[f"cpu_s_{side}"] >= relay + agent, secure
    assert secure["mean_record_bytes"] > 0
    for ch in ("plain", "secure", "qemu-tls"):
        assert report["results"][ch]["completed"] == 1
        assert report["results"][ch]["throughput_mbps"] > 0
    assert report["by_dirty_rate"]["0"] == report["results"]
    assert set(report["ratios"]) == {
        "secure/plain",
        "secure/qemu-tls",
        "qemu-tls/plain",
        "heartbeat_gap_ms_secure_minus_plain",
        "gap_beyond_downtime_ms_secure_minus_plain",
        "trustmig_added_cpu_s_per_gib",
        "cpu_overhead_vs_cipher",
    }
    assert report["cipher"]["both_sides_cpu_s_per_gib"] > 0
    assert all(report["ratios"][k] > 0 for k in ("secure/plain", "secure/qemu-tls"))
    assert seen[-1] == (3, 3, "done")
    assert not _qemu_children(), "a QEMU of the benchmark outlived it"


@pytest.mark.netns
@pytest.mark.tpm
def test_five_channels_between_namespaced_hosts(tmp_path: Path, guest_image: object) -> None:
    """Every channel crosses the hosts' migration network; the IPsec ones through a real
    IKEv2/ESP tunnel, whose daemons' CPU is counted; nothing is left running afterwards."""
    from trustmig.netns.topology import existing_namespaces

    channels = ("plain", "secure", "qemu-tls", "ipsec", "secure+ipsec")
    cfg = BenchConfig(channels=channels, memory_mib=256, fill_mib=48, repeat=1, netns=True)
    before = existing_namespaces()
    report = run_migrate_bench(cfg, workdir=tmp_path / "bench")
    assert [r["channel"] for r in report["runs"]] == list(channels)
    for run in report["runs"]:
        assert run["status"] == "completed" and run["integrity_ok"] is True, run
        assert run["cpu_s_per_gib_source"] and run["cpu_s_per_gib_destination"], run
    assert {"secure/plain", "ipsec/plain", "secure/ipsec", "secure+ipsec/secure"} <= set(
        report["ratios"]
    )
    assert existing_namespaces() == before
    assert _charons() == []


def _charons() -> list[int]:
    out = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "charon":
                out.append(int(comm.parent.name))
        except OSError:
            continue
    return out
