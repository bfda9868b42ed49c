"""Replay: a recorded migration stream is sent again, later, to a destination.

The attacker records a whole migration on the wire. Later, while the guest runs on its new
host, the recording is played to a destination that waits for a migration. In the baseline the
destination loads it and starts a second, stale copy of the guest (its heartbeat counter goes
back in time). trustmig's handshake uses fresh ephemeral keys and the prepared migration id, so
the recording is refused at its first message.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from trustmig.hypervisor.qemu import QemuVM
from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.proxy import Sniffer
from trustmig.lab.targets import HONEST, LabEnv

NAME = "replay"
RECORD_LIMIT = 512 * 1024 * 1024


def _replay(port: int, data: bytes, read_s: float = 5.0) -> dict[str, object]:
    """Blocking: connect, send the recording, read what comes back until close or timeout."""
    sent, answer, closed_by_peer = 0, b"", False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            view = memoryview(data)
            while sent < len(data):
                sent += s.send(view[sent : sent + (1 << 20)])
        except OSError:
            closed_by_peer = True
        s.settimeout(read_s)
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                answer += chunk[: 4096 - len(answer)]
            closed_by_peer = True
    return {
        "bytes_replayed": sent,
        "bytes_total": len(data),
        "answer_bytes": len(answer),
        "closed_by_peer": closed_by_peer,
    }


async def baseline(env: LabEnv) -> Outcome:
    b = env.baseline
    rec = Sniffer(b"\x00never", record_limit=RECORD_LIMIT)
    src, dst, _ = await b.migrate_tapped(NAME, rec)
    await src.stop()  # the operator retires the source once the guest runs on its new host
    recording = bytes(rec.recordings.get(0, b""))
    await asyncio.sleep(1.0)  # "later": the real guest has moved on
    live_seq = _last_seq(dst)
    later, later_port = await b.destination(NAME)
    sent = await asyncio.to_thread(_replay, later_port, recording)
    state = await b.settle(later)
    await asyncio.sleep(0.5)
    replayed_seq = _first_seq(later)
    guest = await b.state({"destination": dst, "replayed": later})
    return Outcome(
        compromised=state == "running",
        outcome=f"a {len(recording) / 1e6:.0f} MB recording replayed later was loaded and runs "
        f"({state}): {guest['running_copies']} copies of the guest, the replayed one restarting "
        f"at heartbeat {replayed_seq} while the real one was at {live_seq}",
        evidence={
            **sent,
            "replayed_destination": state,
            "live_heartbeat": live_seq,
            "replayed_heartbeat": replayed_seq,
        },
        guest=guest,
    )


def _last_seq(vm: QemuVM) -> int | None:
    hbs = vm.console.heartbeats_since(0)
    return hbs[-1].seq if hbs else None


def _first_seq(vm: QemuVM) -> int | None:
    hbs = vm.console.heartbeats_since(0)
    return hbs[0].seq if hbs else None


async def trustmig(env: LabEnv) -> Outcome:
    t = env.trustmig
    rec = Sniffer(b"\x00never", record_limit=RECORD_LIMIT)
    res, err = await t.migrate_tapped(NAME, HONEST, rec)
    if res is None:
        raise RuntimeError(f"the migration to record failed: {err}")
    recording = bytes(rec.recordings.get(0, b""))
    await asyncio.sleep(1.0)
    before = await t.host_status(HONEST)
    data_port = int(t.cluster.hosts[HONEST].data_listen.rsplit(":", 1)[1])
    sent = await asyncio.to_thread(_replay, data_port, recording)
    await asyncio.sleep(0.5)
    after = await t.host_status(HONEST)
    refused = (
        after["refused_data_connections"][len(before["refused_data_connections"]) :]
        or after["refused_data_connections"][-1:]
    )
    new_incoming = len(after["incoming"]) - len(before["incoming"])
    guest = await t.state(NAME)
    reason = refused[-1]["reason"] if refused else "no refusal recorded"
    return Outcome(
        compromised=new_incoming > 0 or guest["running_copies"] != 1,
        outcome=f"replayed {len(recording) / 1e6:.0f} MB recording refused: {reason}",
        evidence={**sent, "refusal": reason, "new_incoming_migrations": new_incoming},
        guest=guest,
    )


ATTACK = Attack(
    name=NAME,
    title="Replay of a recorded migration",
    paper="Captured migration traffic is replayed later to restore a stale VM state or to "
    "run a second copy of the VM.",
    x805=(
        ("data_integrity", "infrastructure", "control"),
        ("authentication", "infrastructure", "control"),
        ("communication_security", "infrastructure", "control"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
