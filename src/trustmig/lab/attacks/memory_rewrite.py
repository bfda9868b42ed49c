"""Xensploit-style memory rewriting in flight by a man in the middle.

The proxy replaces the guest's secret marker with another value of the same length wherever it
appears in the stream; where the marker is not recognisable (trustmig) it overwrites 64 bytes
blindly at 8 MiB into the stream instead. The evidence is the destination guest's own check of
its marker pages after the migration, and for trustmig whether the migration was stopped before
the tampered bytes could reach a running guest.
"""

from __future__ import annotations

from typing import Any

from trustmig.hypervisor.spec import DEFAULT_SECRET
from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.proxy import BlindTamper, Rewriter
from trustmig.lab.targets import HONEST, LabEnv

SECRET = DEFAULT_SECRET.encode()
FORGED = b"X" * len(SECRET)
NAME = "memory-rewrite"
TAMPER_AT = 8 * 1024 * 1024


def _altered(guest: dict[str, Any]) -> bool:
    """True when a running copy's memory check shows pages or markers that changed."""
    return guest["running_copies"] > 0 and guest["memory_intact"] is False


async def baseline(env: LabEnv) -> Outcome:
    b = env.baseline
    rw = Rewriter(SECRET, FORGED)
    src, dst, prog = await b.migrate_tapped(NAME, rw)
    guest = await b.state({"source": src, "destination": dst})
    chk = guest["checks"].get("destination", {})
    return Outcome(
        compromised=rw.replaced > 0 and _altered(guest),
        outcome=f"{rw.replaced} marker copies rewritten in flight; the destination guest runs "
        f"with {chk.get('marker_ok', '?')}/{chk.get('marker_total', '?')} markers intact",
        evidence={"rewritten": rw.replaced, "migration": prog.status, "destination_check": chk},
        guest=guest,
    )


async def trustmig(env: LabEnv) -> Outcome:
    t = env.trustmig
    tap = BlindTamper(SECRET, FORGED, at_offset=TAMPER_AT)
    res, err = await t.migrate_tapped(NAME, HONEST, tap, {"max_bandwidth_mibps": 64})
    guest = await t.state(NAME)
    completed = res is not None and res.get("status") == "completed"
    return Outcome(
        compromised=_altered(guest) or (completed and tap.tampered > 0),
        outcome=("migration aborted: " + (err or ""))
        if not completed
        else f"migration completed although {tap.tampered} bytes were altered",
        evidence={
            "pattern_found_in_stream": tap.replaced,
            "bytes_tampered": tap.tampered,
            "error": err,
        },
        guest=guest,
    )


ATTACK = Attack(
    name=NAME,
    title="Memory rewriting in flight (Xensploit)",
    paper="A man in the middle modifies guest memory while it migrates (Xensploit: e.g. "
    "patching sshd's authentication or sudo in the passing pages).",
    x805=(
        ("data_integrity", "infrastructure", "end_user"),
        ("communication_security", "infrastructure", "end_user"),
        ("data_integrity", "applications", "end_user"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
