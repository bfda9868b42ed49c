"""Rogue destination: a host whose hypervisor is not the approved one asks to receive a VM.

The destination runs a QEMU binary changed after the administrator approved its measurement
(a wrapper script standing in for a trojaned hypervisor). The evidence is how many bytes of
guest memory reach it: the baseline does not look at the destination at all; trustmig checks
the destination's TPM quote before the first byte of memory leaves.
"""

from __future__ import annotations

import shutil

from trustmig.hypervisor.spec import DEFAULT_SECRET
from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.proxy import Sniffer
from trustmig.lab.targets import ROGUE, LabEnv

NAME = "rogue-destination"
SECRET = DEFAULT_SECRET.encode()
#: More than this many bytes means guest memory, not just handshake messages, was delivered.
MEMORY_BYTES = 64 * 1024


async def baseline(env: LabEnv) -> Outcome:
    b = env.baseline
    real = shutil.which("qemu-system-x86_64")
    rogue = env.workdir / "baseline-rogue" / "qemu-system-x86_64"
    rogue.parent.mkdir(parents=True, exist_ok=True)
    rogue.write_text(f'#!/bin/sh\n# trojaned hypervisor\nexec {real} "$@"\n')
    rogue.chmod(0o755)
    sniff = Sniffer(SECRET)
    src, dst, prog = await b.migrate_tapped(NAME, sniff, binary=str(rogue))
    guest = await b.state({"source": src, "rogue destination": dst})
    return Outcome(
        compromised=sniff.bytes_seen > MEMORY_BYTES,
        outcome=f"the unverified destination received {sniff.bytes_seen / 1e6:.0f} MB of guest "
        f"memory and runs the guest (migration {prog.status})",
        evidence={
            "bytes_received": sniff.bytes_seen,
            "secret_marker_hits": sniff.hits,
            "migration": prog.status,
        },
        guest=guest,
    )


async def trustmig(env: LabEnv) -> Outcome:
    t = env.trustmig
    sniff = Sniffer(SECRET)
    res, err = await t.migrate_tapped(NAME, ROGUE, sniff)
    guest = await t.state(NAME)
    return Outcome(
        compromised=sniff.bytes_seen > MEMORY_BYTES or res is not None,
        outcome=f"refused before any memory left ({sniff.bytes_seen} handshake bytes on the "
        f"wire): {err}"
        if res is None
        else "the rogue destination received the VM",
        evidence={
            "bytes_received": sniff.bytes_seen,
            "secret_marker_hits": sniff.hits,
            "error": err,
        },
        guest=guest,
    )


ATTACK = Attack(
    name=NAME,
    title="Rogue destination (unexpected hypervisor)",
    paper="A compromised or impersonated destination receives the VM: the source must verify "
    "the platform (attestation) before migrating.",
    x805=(
        ("authentication", "infrastructure", "control"),
        ("access_control", "infrastructure", "control"),
        ("data_confidentiality", "infrastructure", "end_user"),
        ("privacy", "infrastructure", "end_user"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
