"""Reduce individual runs to medians per channel and throughput ratios between channels.

Medians rather than means: on a shared two-core host a single run can be slowed by a neighbour
several-fold, and the median of a few interleaved runs is the figure that survives such noise.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from trustmig.bench.config import rate_key

#: Figures summarised per channel; a run that lacks one (e.g. handshake_ms outside ``secure``)
#: simply does not contribute to it.
METRICS: tuple[str, ...] = (
    "throughput_mbps",
    "total_ms",
    "downtime_ms",
    "heartbeat_gap_ms",
    "gap_beyond_downtime_ms",
    "wall_ms",
    "bytes_transferred",
    "cpu_s_source",
    "cpu_s_destination",
    "cpu_s_per_gib_source",
    "cpu_s_per_gib_destination",
    # where trustmig's CPU goes, per side (the rest of a side's figure is its QEMU)
    "cpu_s_per_gib_relay_source",
    "cpu_s_per_gib_relay_destination",
    "cpu_s_per_gib_agent_source",
    "cpu_s_per_gib_agent_destination",
    "mean_record_bytes",
    "handshake_ms",
    "time_to_first_byte_ms",
    "rounds",
)
GIB = 1024**3


def per_gib(cpu_s: float, transferred_bytes: int) -> float | None:
    """CPU seconds per GiB moved; ``None`` when nothing was moved (no meaningful rate)."""
    if transferred_bytes <= 0:
        return None
    return round(cpu_s / (transferred_bytes / GIB), 3)


def throughput_mbps(transferred_bytes: int, total_ms: float | None) -> float | None:
    """MB/s (10^6 bytes) of guest RAM moved over QEMU's total migration time."""
    if not total_ms or total_ms <= 0:
        return None
    return round(transferred_bytes / 1e6 / (total_ms / 1000), 1)


def median(values: Iterable[Any]) -> float | None:
    """Median of the numbers among ``values`` (rounded to 3 places), None if there are none."""
    vals = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not vals:
        return None
    return round(statistics.median(vals), 3)


def summarize_channel(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the completed runs of one channel, plus how many runs there were."""
    ok = [r for r in runs if r.get("status") == "completed"]
    out: dict[str, Any] = {
        "runs": len(runs),
        "completed": len(ok),
        "integrity_ok": all(r.get("integrity_ok") is True for r in runs) and bool(runs),
    }
    for m in METRICS:
        med = median(r.get(m) for r in ok)
        if med is not None:
            out[m] = med
    return out


def summarize(
    runs: Sequence[dict[str, Any]],
    channels: Sequence[str],
    dirty_rates: Sequence[float],
    modes: Sequence[str] = ("precopy",),
) -> dict[str, Any]:
    """The report's ``results``, ``by_dirty_rate``, ``ratios`` and ``ratios_by_dirty_rate``.

    ``results`` is the first dirty rate. Pre-copy figures sit at the channel level; post-copy
    ones, when measured, under the channel's ``"postcopy"`` key.
    """
    by_rate: dict[str, dict[str, Any]] = {}
    for rate in dirty_rates:
        key = rate_key(rate)
        chans: dict[str, Any] = {}
        for ch in channels:
            mine = [r for r in runs if r["channel"] == ch and rate_key(r["dirty_rate"]) == key]
            entry = summarize_channel([r for r in mine if r["mode"] == "precopy"])
            for mode in modes:
                if mode != "precopy":
                    entry[mode] = summarize_channel([r for r in mine if r["mode"] == mode])
            chans[ch] = entry
        by_rate[key] = chans
    first = by_rate[rate_key(dirty_rates[0])] if dirty_rates else {}
    return {
        "results": first,
        "by_dirty_rate": by_rate,
        "ratios": ratios(first),
        "ratios_by_dirty_rate": {k: ratios(v) for k, v in by_rate.items()},
    }


#: (numerator, denominator) throughput ratios reported when both channels were measured
RATIOS = (
    ("secure", "plain"), ("secure", "qemu-tls"), ("ipsec", "plain"), ("secure", "ipsec"),
    ("secure+ipsec", "plain"), ("secure+ipsec", "secure"), ("qemu-tls", "plain"),
)  # fmt: skip


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """Throughput ratios between the channels that were measured (see ``RATIOS``), and what
    the guest felt with trustmig beyond QEMU's own migration (heartbeat gaps, post-copy time)."""
    out: dict[str, float] = {}
    for num, den in RATIOS:
        a = (results.get(num) or {}).get("throughput_mbps")
        b = (results.get(den) or {}).get("throughput_mbps")
        if a and b:
            out[f"{num}/{den}"] = round(float(a) / float(b), 3)
    secure, plain = results.get("secure") or {}, results.get("plain") or {}
    _difference(out, "heartbeat_gap_ms_secure_minus_plain", secure, plain, "heartbeat_gap_ms")
    _difference(out, "gap_beyond_downtime_ms_secure_minus_plain", secure, plain,
                "gap_beyond_downtime_ms")  # fmt: skip
    pc_secure, pc_plain = secure.get("postcopy") or {}, plain.get("postcopy") or {}
    _difference(out, "postcopy_heartbeat_gap_ms_secure_minus_plain", pc_secure, pc_plain,
                "heartbeat_gap_ms")  # fmt: skip
    a, b = pc_secure.get("total_ms"), pc_plain.get("total_ms")
    if a and b:
        out["postcopy_total_ms_secure/plain"] = round(float(a) / float(b), 3)
    return out


def _difference(
    out: dict[str, float], key: str, a: dict[str, Any], b: dict[str, Any], metric: str
) -> None:
    x, y = a.get(metric), b.get(metric)
    if x is not None and y is not None:
        out[key] = round(float(x) - float(y), 1)


def added_cpu_s_per_gib(results: dict[str, Any]) -> float | None:
    """trustmig's CPU beyond QEMU's own migration, both sides, per GiB moved (medians)."""
    secure, plain = results.get("secure") or {}, results.get("plain") or {}
    sides = ("cpu_s_per_gib_source", "cpu_s_per_gib_destination")
    if any(secure.get(k) is None or plain.get(k) is None for k in sides):
        return None
    return round(sum(float(secure[k]) - float(plain[k]) for k in sides), 3)


def cipher_overhead(results: dict[str, Any], cipher_both_sides: float) -> dict[str, float]:
    """``trustmig_added_cpu_s_per_gib`` and ``cpu_overhead_vs_cipher`` (that added CPU as a
    multiple of what sealing and opening the same bytes costs; 1.0 is the floor)."""
    added = added_cpu_s_per_gib(results)
    if added is None or cipher_both_sides <= 0:
        return {}
    return {
        "trustmig_added_cpu_s_per_gib": added,
        "cpu_overhead_vs_cipher": round(added / cipher_both_sides, 2),
    }
