"""Pure logic of the migration benchmark: option parsing, run order, medians and ratios."""

from __future__ import annotations

from typing import Any

import pytest

from trustmig.bench import (
    BenchConfig,
    BenchConfigError,
    parse_channels,
    parse_dirty_rates,
    plan_runs,
)
from trustmig.bench.cipher import measure_cipher_cost
from trustmig.bench.cpu import CpuMeter
from trustmig.bench.record import integrity_record
from trustmig.bench.stats import cipher_overhead, per_gib, summarize, throughput_mbps
from trustmig.channel.errors import ChannelError


def test_ipsec_channels_need_the_namespaced_hosts() -> None:
    from trustmig.bench import BenchConfig

    with pytest.raises(BenchConfigError, match="add --netns"):
        BenchConfig(channels=parse_channels("plain,ipsec"))
    assert BenchConfig(channels=parse_channels("secure+ipsec,ipsec"), netns=True).netns


def test_parse_channels_keeps_order_and_refuses_unknown() -> None:
    assert parse_channels("secure, plain") == ("secure", "plain")
    with pytest.raises(BenchConfigError, match="unknown channel 'ssh'"):
        parse_channels("plain,ssh")
    with pytest.raises(BenchConfigError, match="given twice"):
        parse_channels("plain,plain")
    with pytest.raises(BenchConfigError, match="empty"):
        parse_channels(" , ")


def test_parse_dirty_rates() -> None:
    assert parse_dirty_rates("0,64") == (0.0, 64.0)
    with pytest.raises(BenchConfigError, match="'fast' is not a number"):
        parse_dirty_rates("0,fast")
    with pytest.raises(BenchConfigError, match="out of range"):
        parse_dirty_rates("-1")


def test_config_defaults_and_limits() -> None:
    cfg = BenchConfig()
    assert cfg.memory_mib == 1024 and cfg.fill == 1024 - 160 and cfg.repeat == 3
    assert cfg.prealloc_destination is True
    assert cfg.to_json()["fill_mib"] == 864
    with pytest.raises(BenchConfigError, match="does not fit a 256 MiB guest"):
        BenchConfig(memory_mib=256, fill_mib=250)
    with pytest.raises(BenchConfigError, match="--repeat 0"):
        BenchConfig(repeat=0)


def test_runs_interleave_channels_within_each_repetition() -> None:
    cfg = BenchConfig(dirty_rates=(0.0, 64.0), repeat=2, postcopy=True)
    plans = plan_runs(cfg)
    assert len(plans) == 3 * 2 * 2 * 2
    assert [p.channel for p in plans[:6]] == ["plain", "secure", "qemu-tls"] * 2
    assert [p.mode for p in plans[:6]] == ["precopy"] * 3 + ["postcopy"] * 3
    assert {p.rep for p in plans[:12]} == {0} and {p.rep for p in plans[12:]} == {1}
    assert [p.index for p in plans] == list(range(len(plans)))


def _run(
    ch: str, rate: float, mbps: float, mode: str = "precopy", ok: bool = True
) -> dict[str, Any]:
    return {
        "channel": ch,
        "dirty_rate": rate,
        "mode": mode,
        "status": "completed" if ok else "failed",
        "throughput_mbps": mbps if ok else None,
        "cpu_s_per_gib_source": 1.0,
        "integrity_ok": ok,
    }


def test_summary_medians_ratios_and_failed_runs() -> None:
    runs = [
        _run("plain", 0, 1000), _run("plain", 0, 3000), _run("plain", 0, 2000),
        _run("secure", 0, 500), _run("secure", 0, 700), _run("secure", 0, 100, ok=False),
        _run("qemu-tls", 0, 250),
        _run("plain", 64, 800), _run("secure", 64, 400), _run("qemu-tls", 64, 200),
    ]  # fmt: skip
    s = summarize(runs, ("plain", "secure", "qemu-tls"), (0.0, 64.0))
    assert s["results"] is s["by_dirty_rate"]["0"]
    assert s["results"]["plain"]["throughput_mbps"] == 2000
    assert s["results"]["secure"]["throughput_mbps"] == 600  # the failed run does not count
    assert s["results"]["secure"]["completed"] == 2 and s["results"]["secure"]["runs"] == 3
    assert s["results"]["secure"]["integrity_ok"] is False
    assert s["ratios"] == {"secure/plain": 0.3, "secure/qemu-tls": 2.4, "qemu-tls/plain": 0.125}
    assert s["ratios_by_dirty_rate"]["64"] == {
        "secure/plain": 0.5, "secure/qemu-tls": 2.0, "qemu-tls/plain": 0.25,
    }  # fmt: skip


def test_summary_postcopy_nested_under_channel() -> None:
    runs = [_run("plain", 0, 1000), _run("plain", 0, 300, mode="postcopy")]
    s = summarize(runs, ("plain",), (0.0,), ("precopy", "postcopy"))
    assert s["results"]["plain"]["throughput_mbps"] == 1000
    assert s["results"]["plain"]["postcopy"]["throughput_mbps"] == 300
    assert s["ratios"] == {}


def test_derived_figures() -> None:
    assert throughput_mbps(2_000_000_000, 1000) == 2000.0
    assert throughput_mbps(10, 0) is None
    assert per_gib(3.0, 2 * 1024**3) == 1.5
    assert per_gib(1.0, 0) is None


def test_integrity_requires_clean_pages_and_same_digest_when_idle() -> None:
    good = {"pages": 10, "bad_pages": 0, "first_bad": -1, "marker_ok": 4, "marker_total": 4,
            "digest": "aa"}  # fmt: skip
    moved = {**good, "digest": "bb"}
    assert integrity_record(good, good, 0)["integrity_ok"] is True
    assert integrity_record(good, moved, 0)["integrity_ok"] is False
    assert integrity_record(good, moved, 64)["integrity_ok"] is True
    assert integrity_record(good, {**good, "bad_pages": 1}, 64)["integrity_ok"] is False


def test_cpu_meter_counts_this_process() -> None:
    import os

    m = CpuMeter().start(os.getpid())
    x = 0
    for i in range(2_000_000):
        x += i
    assert x > 0
    used = m.stop()
    assert used >= 0.0
    assert m.final[os.getpid()] >= m.baseline[os.getpid()]
    gone = CpuMeter(baseline={999_999_999: 0.0})
    assert gone.stop() == 0.0


def test_impossible_downtime_is_set_aside() -> None:
    from trustmig.bench.record import finish_record
    from trustmig.hypervisor.migration import MigrationProgress

    prog = MigrationProgress.from_qmp(
        {"status": "completed", "total-time": 300, "downtime": 1_157_626,
         "ram": {"transferred": 2 * 1024**3, "total": 2 * 1024**3, "dirty-sync-count": 2}}
    )  # fmt: skip
    rec: dict[str, Any] = {"integrity_ok": True}
    finish_record(rec, prog, wall_ms=310.0, cpu_s_source=1.0, cpu_s_destination=2.0,
                  mode_used="postcopy")  # fmt: skip
    assert rec["status"] == "completed"
    assert rec["downtime_ms"] is None and rec["downtime_ms_reported"] == 1_157_626
    assert rec["gap_beyond_downtime_ms"] is None  # no true downtime to subtract
    assert rec["cpu_s_per_gib_source"] == 0.5 and rec["cpu_s_per_gib_destination"] == 1.0


def test_felt_gap_and_postcopy_time_beyond_plain() -> None:
    def run(ch: str, mode: str, gap: float, total: float) -> dict[str, Any]:
        return {**_run(ch, 0, 1000, mode), "heartbeat_gap_ms": gap, "total_ms": total}

    runs = [run("plain", "precopy", 40, 900), run("secure", "precopy", 55, 1500),
            run("secure", "precopy", 65, 1700), run("plain", "postcopy", 30, 1000),
            run("secure", "postcopy", 42, 1300)]  # fmt: skip
    s = summarize(runs, ("plain", "secure"), (0.0,), ("precopy", "postcopy"))
    assert s["results"]["secure"]["heartbeat_gap_ms"] == 60
    assert s["ratios"]["heartbeat_gap_ms_secure_minus_plain"] == 20
    assert s["ratios"]["postcopy_heartbeat_gap_ms_secure_minus_plain"] == 12
    assert s["ratios"]["postcopy_total_ms_secure/plain"] == 1.3


def test_added_cpu_is_a_multiple_of_the_ciphers_own_cost() -> None:
    results = {
        "plain": {"cpu_s_per_gib_source": 0.5, "cpu_s_per_gib_destination": 0.4},
        "secure": {"cpu_s_per_gib_source": 0.9, "cpu_s_per_gib_destination": 0.6},
    }
    assert cipher_overhead(results, 0.3) == {
        "trustmig_added_cpu_s_per_gib": 0.6, "cpu_overhead_vs_cipher": 2.0,
    }  # fmt: skip
    assert cipher_overhead({"plain": results["plain"]}, 0.3) == {}


def test_cipher_cost_is_measured_with_the_channels_records() -> None:
    cost = measure_cipher_cost(sample_bytes=4 << 20, repeat=1)
    assert cost.cipher == "aes-256-gcm" and cost.record_bytes == 256 * 1024
    assert cost.seal_cpu_s_per_gib > 0 and cost.open_cpu_s_per_gib > 0
    with pytest.raises(ChannelError, match="max_plaintext 0 out of range"):
        measure_cipher_cost(record_bytes=0, sample_bytes=1 << 20, repeat=1)


def test_relay_alone_carries_every_byte_and_costs_more_than_one_plain_hop() -> None:
    from trustmig.bench.relay import run_relay_bench

    report = run_relay_bench(total_mib=16, repeat=1)
    assert report["relay"]["gbps"] > 0 and report["plain"]["gbps"] > 0
    relay, plain = report["relay"], report["plain"]
    assert relay["cpu_s_per_gib_source"] > 0 and relay["cpu_s_per_gib_destination"] > 0
    # sealing and opening cannot be free: the relayed stream costs more CPU than the bare hop
    assert (relay["cpu_s_per_gib_source"] + relay["cpu_s_per_gib_destination"]
            > plain["cpu_s_per_gib_source"] + plain["cpu_s_per_gib_destination"])  # fmt: skip
    assert report["relay_overhead_vs_cipher"] == round(
        report["relay_cpu_s_per_gib_added"] / report["cipher"]["both_sides_cpu_s_per_gib"], 2
    )


def test_bench_relay_command_reports_json_and_refuses_a_bad_size() -> None:
    import json

    from typer.testing import CliRunner

    from trustmig.cli.main import app

    res = CliRunner().invoke(app, ["bench", "relay", "--total-mib", "16", "--repeat", "1",
                                   "--json"])  # fmt: skip
    assert res.exit_code == 0, res.stdout
    assert json.loads(res.stdout)["relay"]["gbps"] > 0
    bad = CliRunner().invoke(app, ["bench", "relay", "--total-mib", "1"])
    assert bad.exit_code == 2 and "total-mib" in bad.output


def test_relay_bench_reports_a_side_that_dies_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    from trustmig.bench import relay

    monkeypatch.setattr(relay, "_carry", lambda *a: os._exit(3))  # in the forked sides
    with pytest.raises(RuntimeError, match=r"died|exited"):
        relay.run_relay_bench(total_mib=16, repeat=1)


def test_the_pause_beyond_qemus_downtime_is_the_handovers_own() -> None:
    from trustmig.bench.record import finish_record
    from trustmig.hypervisor.migration import MigrationProgress

    def run(ch: str, gap: float, downtime: int) -> dict[str, Any]:
        prog = MigrationProgress.from_qmp(
            {"status": "completed", "total-time": 900, "downtime": downtime,
             "ram": {"transferred": 1024**3, "total": 1024**3, "dirty-sync-count": 2}}
        )  # fmt: skip
        rec = {**_run(ch, 0, 1000, "precopy"), "heartbeat_gap_ms": gap, "integrity_ok": True}
        finish_record(rec, prog, wall_ms=900.0, cpu_s_source=1.0, cpu_s_destination=1.0,
                      mode_used="precopy")  # fmt: skip
        return rec

    # QEMU's downtime differs between the runs; the pause beyond it is what the handover adds
    runs = [run("plain", 220, 200), run("secure", 300, 270), run("secure", 160, 130)]
    assert [r["gap_beyond_downtime_ms"] for r in runs] == [20, 30, 30]
    s = summarize(runs, ("plain", "secure"), (0.0,))
    assert s["ratios"]["heartbeat_gap_ms_secure_minus_plain"] == 10
    assert s["ratios"]["gap_beyond_downtime_ms_secure_minus_plain"] == 10
