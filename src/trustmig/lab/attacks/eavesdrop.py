"""Eavesdropping: a sniffer on the migration path looks for the guest's secret marker.

The guest's workload keeps a secret marker at the start of 64 pages; the sniffer counts how
often those bytes pass in the stream. In the baseline the memory travels in clear; through
trustmig the sniffer sees only AES-GCM records.
"""

from __future__ import annotations

from trustmig.hypervisor.spec import DEFAULT_SECRET
from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.proxy import Sniffer
from trustmig.lab.targets import HONEST, LabEnv

SECRET = DEFAULT_SECRET.encode()
NAME = "eavesdrop"


async def baseline(env: LabEnv) -> Outcome:
    b = env.baseline
    sniff = Sniffer(SECRET)
    src, dst, prog = await b.migrate_tapped(NAME, sniff)
    guest = await b.state({"source": src, "destination": dst})
    return Outcome(
        compromised=sniff.hits > 0,
        outcome=f"secret marker read {sniff.hits} times in {sniff.bytes_seen / 1e6:.0f} MB of "
        f"plaintext stream (migration {prog.status})",
        evidence={
            "marker_hits": sniff.hits,
            "bytes_seen": sniff.bytes_seen,
            "migration": prog.status,
        },
        guest=guest,
    )


async def trustmig(env: LabEnv) -> Outcome:
    t = env.trustmig
    sniff = Sniffer(SECRET)
    res, err = await t.migrate_tapped(NAME, HONEST, sniff)
    guest = await t.state(NAME)
    status = res["status"] if res else f"failed: {err}"
    return Outcome(
        compromised=sniff.hits > 0,
        outcome=f"secret marker read {sniff.hits} times in {sniff.bytes_seen / 1e6:.0f} MB of "
        f"ciphertext (migration {status})",
        evidence={
            "marker_hits": sniff.hits,
            "bytes_seen": sniff.bytes_seen,
            "migration": status,
            "channel": res.get("channel") if res else None,
        },
        guest=guest,
    )


ATTACK = Attack(
    name=NAME,
    title="Eavesdropping on the migration stream",
    paper="Migration data in transit is exposed to passive snooping: passwords, keys and "
    "application data held in guest memory can be read off the network.",
    x805=(
        ("data_confidentiality", "infrastructure", "end_user"),
        ("communication_security", "infrastructure", "end_user"),
        ("privacy", "applications", "end_user"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
