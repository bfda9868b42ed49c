"""Migration flood (DoS): bogus connections and requests hit a destination while a legitimate
migration to it runs.

Eight loopback addresses (127.0.0.2-9) open connections at about 1000/s: immediate closes,
half-open sockets, garbage bytes, anonymous and foreign-certificate TLS requests, bogus
handshakes. The baseline's target is QEMU's incoming migration port; trustmig's are the
destination agent's control and data listeners. Evidence: did the legitimate migration
complete, how much slower than an unloaded one in the same run, and (trustmig) the agent's
memory and its guard's rule hits.
"""

from __future__ import annotations

import asyncio
from typing import Any

from trustmig.config import parse_hostport
from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.flood import ALL_KINDS, Flood, FloodSpec, RssSampler
from trustmig.lab.targets import HONEST, OWNER, LabEnv

NAME = "flood"
SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 10))
KINDS_QEMU = ("connect", "halfopen", "garbage")


def _spec(targets: list[tuple[str, int]], kinds: tuple[str, ...]) -> FloodSpec:
    return FloodSpec(
        targets=targets,
        kinds=kinds,
        rate_per_s=1000,
        max_attempts=60_000,
        duration_s=90,
        max_open=256,
        hold_s=10,
        source_ips=SOURCES,
    )


def _mbps(transferred: int, total_ms: int | None) -> float | None:
    return round(transferred / 1e6 / (total_ms / 1000), 1) if total_ms else None


def _flood_summary(rep: dict[str, Any]) -> dict[str, Any]:
    return {
        "attempted": rep["total_attempted"],
        "rate_per_s": rep["achieved_rate_per_s"],
        "closed_by_target": sum(k["reset_or_closed_by_peer"] for k in rep["kinds"].values()),
        "answered": sum(k["answered"] for k in rep["kinds"].values()),
    }


async def baseline(env: LabEnv) -> Outcome:
    b = env.baseline
    src = await b.boot(f"{NAME}-ref")
    dst, port = await b.destination(f"{NAME}-ref")
    ref = await b.migrate(src, port)
    await b.close()
    src = await b.boot(NAME)
    dst, port = await b.destination(NAME)
    with Flood(_spec([("127.0.0.1", port)], KINDS_QEMU)) as flood:
        await asyncio.sleep(1.0)
        prog = await b.migrate(src, port, timeout=60)
        state = await b.settle(dst, timeout=10)
    guest = await b.state({"source": src, "destination": dst})
    done = prog.status == "completed" and state == "running"
    ratio = None
    if done and ref.total_ms and prog.total_ms:
        ratio = round(
            (_mbps(prog.transferred, prog.total_ms) or 0)
            / (_mbps(ref.transferred, ref.total_ms) or 1),
            2,
        )
    return Outcome(
        compromised=not done or (ratio is not None and ratio < 0.5),
        outcome=f"legitimate migration {prog.status}"
        + (f" ({prog.error})" if prog.error else "")
        + f"; destination {state}; flooded/unloaded throughput {ratio}",
        evidence={
            "unloaded_mbps": _mbps(ref.transferred, ref.total_ms),
            "flooded_mbps": _mbps(prog.transferred, prog.total_ms) if done else None,
            "ratio": ratio,
            "flood": _flood_summary(flood.report().to_dict()),
        },
        guest=guest,
    )


async def trustmig(env: LabEnv) -> Outcome:
    t = env.trustmig
    await t.boot(f"{NAME}-ref")
    ref, _ = await t.migrate(f"{NAME}-ref", HONEST)
    await t.stop_vm(f"{NAME}-ref")
    await t.boot(NAME)
    hh = t.cluster.hosts[HONEST]
    assert hh.pid is not None
    targets = [parse_hostport(hh.control), parse_hostport(hh.data_listen)]
    before = await t.cluster.guard_counters(HONEST, OWNER)
    with RssSampler(hh.pid, interval_ms=50) as rss, Flood(_spec(targets, ALL_KINDS)) as flood:
        await asyncio.sleep(1.0)
        res, err = await t.migrate(NAME, HONEST)
    after = await t.cluster.guard_counters(HONEST, OWNER)
    guest = await t.state(NAME)
    ratio = None
    if res and ref and ref.get("throughput_mbps") and res.get("throughput_mbps"):
        ratio = round(res["throughput_mbps"] / ref["throughput_mbps"], 2)
    mem = rss.stats()
    hits = {k: after.get(k, 0) - before.get(k, 0) for k in after if k != "accept"}
    return Outcome(
        compromised=res is None or guest["running_copies"] != 1 or (ratio or 0) < 0.5,
        outcome=(
            f"legitimate migration completed under {flood.report().total_attempted} bogus "
            f"connections; flooded/unloaded throughput {ratio}; agent RSS "
            f"{mem.first_kib // 1024}->{mem.max_kib // 1024} MiB"
        )
        if res
        else f"legitimate migration failed under the flood: {err}",
        evidence={
            "unloaded_mbps": ref.get("throughput_mbps") if ref else None,
            "flooded_mbps": res.get("throughput_mbps") if res else None,
            "ratio": ratio,
            "flood": _flood_summary(flood.report().to_dict()),
            "guard_rule_hits": hits,
            "agent_rss_kib": {"first": mem.first_kib, "max": mem.max_kib},
        },
        guest=guest,
    )


ATTACK = Attack(
    name=NAME,
    title="Migration flood (denial of service)",
    paper="Many bogus migration requests towards a host exhaust its resources so legitimate "
    "migrations (e.g. evacuations) fail.",
    x805=(
        ("availability", "infrastructure", "control"),
        ("availability", "services", "control"),
        ("availability", "infrastructure", "management"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
