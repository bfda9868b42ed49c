"""Connection abort: the migration stream is cut mid-way, in pre-copy and in post-copy.

The question is where the guest runs afterwards: exactly once, with its memory intact, is the
only acceptable answer. A pre-copy cut is survivable for QEMU too (the source never stopped);
a post-copy cut is the hard case, because after the switch-over neither side holds the whole
guest.
"""

from __future__ import annotations

from typing import Any

from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.proxy import Cutter, MitmProxy
from trustmig.lab.targets import HONEST, LabEnv

NAME = "connection-abort"
CUT_AT = 16 * 1024 * 1024
#: A post-copy cut comes this far after the switch, while most of the guest's memory is still
#: on the source.
CUT_AFTER_SWITCH = 4 * 1024 * 1024
BANDWIDTH_MIBPS = 32


def _ok(guest: dict[str, Any]) -> bool:
    return (
        guest["running_copies"] == 1
        and guest["memory_intact"] is True
        and guest["heartbeat_continued"] is True
    )


def _line(case: str, guest: dict[str, Any], detail: str) -> str:
    return (
        f"{case}: {guest['running_copies']} running copies ({guest['where']}), memory "
        f"intact={guest['memory_intact']}; {detail}"
    )


async def baseline(env: LabEnv) -> Outcome:
    b = env.baseline
    cases: dict[str, Any] = {}
    lines: list[str] = []
    for case, postcopy in (("pre-copy", None), ("post-copy", 1)):
        name = f"{NAME}-{case}"
        src = await b.boot(name)
        dst, port = await b.destination(name)
        # the post-copy case cuts after the switch, however long the switch took to come
        cut = (
            Cutter(after_bytes=CUT_AT)
            if postcopy is None
            else Cutter(after_bytes=CUT_AFTER_SWITCH, armed=False)
        )
        with MitmProxy(("127.0.0.1", port), cut) as proxy:
            prog = await b.migrate(
                src,
                proxy.address[1],
                postcopy_after_rounds=postcopy,
                dst=dst,
                max_bandwidth_mibps=BANDWIDTH_MIBPS,
                timeout=30,
                on_postcopy=cut.arm,
            )
            await b.settle(dst, timeout=5)
        guest = await b.state({"source": src, "destination": dst})
        cases[case] = {"cut": cut.cut, "source_status": prog.status, "guest": guest}
        lines.append(_line(case, guest, f"source migration {prog.status}"))
        await b.close()
    worst = min(cases.values(), key=lambda c: _ok(c["guest"]))
    return Outcome(
        compromised=not all(_ok(c["guest"]) for c in cases.values()),
        outcome="; ".join(lines),
        evidence=cases,
        guest=worst["guest"],
    )


async def trustmig(env: LabEnv) -> Outcome:
    t = env.trustmig
    cases: dict[str, Any] = {}
    lines: list[str] = []
    for case, opts in (
        ("pre-copy", {"max_bandwidth_mibps": BANDWIDTH_MIBPS}),
        (
            "post-copy",
            {
                "mode": "postcopy",
                "postcopy_after_rounds": 1,
                "max_bandwidth_mibps": BANDWIDTH_MIBPS,
            },
        ),
    ):
        name = f"{NAME}-{case}"
        cut = Cutter(after_bytes=CUT_AT)
        res, err = await t.migrate_tapped(name, HONEST, cut, opts)
        guest = await t.state(name)
        status = res["status"] if res else "failed"
        cases[case] = {
            "cut": cut.cut,
            "migration": status,
            "error": err,
            "guest": guest,
            "mode_used": res.get("mode") if res else None,
        }
        recovered = (res or {}).get("stream_recoveries") or []
        cases[case]["stream_recoveries"] = recovered
        detail = f"migration {status}" + (f" ({err})" if err else "")
        if recovered:
            detail += f" after {len(recovered)} stream recovery over a new attested session"
        lines.append(_line(case, guest, detail))
        await t.stop_vm(name)
    worst = min(cases.values(), key=lambda c: _ok(c["guest"]))
    return Outcome(
        compromised=not all(_ok(c["guest"]) for c in cases.values()),
        outcome="; ".join(lines),
        evidence=cases,
        guest=worst["guest"],
    )


ATTACK = Attack(
    name=NAME,
    title="Connection abort mid-migration",
    paper="An attacker (or a failure) breaks the migration connection; a protocol that cannot "
    "recover leaves the VM stopped, lost or running twice.",
    x805=(
        ("availability", "infrastructure", "end_user"),
        ("availability", "services", "control"),
        ("data_integrity", "applications", "end_user"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
