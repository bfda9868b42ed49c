"""Malformed streams: mutated and oversized input thrown at the receiving side.

The survey's "loopholes in the migration module": a receiver that trusts its input can be
crashed, hung or made to load corrupted state. The baseline's receiver is QEMU's incoming
migration, fed mutations of a real recorded stream (flipped bytes in page data, truncation,
random bytes or huge length fields after a valid header). trustmig's receivers are the agent's
data and control listeners, fed a budget of random frames, mutated real handshake messages,
truncated and oversized frames. Evidence: crashes, hangs, memory growth, and for QEMU whether
it ran a guest whose memory was silently corrupted.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import time
from typing import Any

from trustmig.channel.handshake import ClientHandshake
from trustmig.channel.identity import LocalIdentity
from trustmig.hypervisor.spec import DEFAULT_SECRET
from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.attacks.replay import _replay
from trustmig.lab.flood import RssSampler
from trustmig.lab.proxy import Sniffer
from trustmig.lab.targets import HONEST, LabEnv
from trustmig.pki.authority import ClusterCA

NAME = "malformed-stream"
SECRET = DEFAULT_SECRET.encode()
SEED = 805
FRAMES = 240
CONCURRENCY = 24
#: A connection the agent keeps open longer than its handshake deadline plus this is a hang.
HANG_GRACE_S = 4.0
#: Where the control-port junk comes from (not the administrators' 127.0.0.1).
CONTROL_ATTACKER = "127.0.0.66"


def _page_data_offsets(rec: bytes, rng: random.Random, count: int = 16) -> list[int]:
    """Offsets certainly inside guest page data: a byte of the workload's secret marker, which
    opens its pages (a random offset may hit a page header, and QEMU then rejects the stream
    instead of loading corrupted memory, which is not what this case is about)."""
    n = len(rec)
    found: list[int] = []
    at = rec.find(SECRET, int(n * 0.3))
    while at != -1 and len(found) < count:
        found.append(at + 1)
        at = rec.find(SECRET, at + len(SECRET))
    if found:
        return found
    return [rng.randrange(int(n * 0.3), int(n * 0.9)) for _ in range(count)]


def _mutations(rec: bytes, rng: random.Random) -> dict[str, bytes]:
    n = len(rec)
    flipped = bytearray(rec)
    for off in _page_data_offsets(rec, rng):
        flipped[off] ^= 0xFF
    return {
        "16 flipped bytes in page data": bytes(flipped),
        "truncated at 60%": rec[: int(n * 0.6)],
        "random bytes after a valid header": rec[:4096] + rng.randbytes(8 << 20),
        "huge length fields after a valid header": rec[:4096] + b"\xff" * 65536,
    }


async def _feed_qemu(env: LabEnv, name: str, data: bytes) -> dict[str, Any]:
    b = env.baseline
    dst, port = await b.destination(name)
    sent = await asyncio.to_thread(_replay, port, data, 2.0)
    state = await b.settle(dst, timeout=20)
    out: dict[str, Any] = {"bytes": len(data), "sent": sent["bytes_replayed"]}
    if state == "exited":
        rc = dst.proc.returncode if dst.proc else None
        out["result"] = "crashed" if rc is not None and rc < 0 else "rejected"
        out["exit"] = rc
        out["stderr"] = dst.stderr_tail(1)
    elif state == "running":
        guest = await b.state({"d": dst})
        chk = guest["checks"].get("d", {})
        out["check"] = chk
        out["result"] = "loaded intact" if guest["memory_intact"] else "silently corrupted"
    else:
        out["result"] = "hung" if state in ("inmigrate", "paused", "unknown") else state
        out["state"] = state
    await dst.kill()
    return out


async def baseline(env: LabEnv) -> Outcome:
    b = env.baseline
    rec = Sniffer(b"\x00never", record_limit=512 << 20)
    await b.migrate_tapped(NAME, rec)
    recording = bytes(rec.recordings.get(0, b""))
    await b.close()
    rng = random.Random(SEED)
    cases = {}
    for i, (label, data) in enumerate(_mutations(recording, rng).items()):
        cases[label] = await _feed_qemu(env, f"{NAME}-{i}", data)
    bad = {
        k: v["result"]
        for k, v in cases.items()
        if v["result"] in ("silently corrupted", "crashed", "hung")
    }
    return Outcome(
        compromised=bool(bad),
        outcome="; ".join(f"{k}: {v['result']}" for k, v in cases.items()),
        evidence={"recording_bytes": len(recording), "cases": cases},
        guest={
            "running_copies": sum(1 for v in cases.values() if v["result"] != "rejected"),
            "where": ",".join(k for k, v in cases.items() if "check" in v) or "nowhere",
            "memory_intact": not any(v["result"] == "silently corrupted" for v in cases.values()),
        },
    )


def _client_hello(env: LabEnv) -> bytes:
    work = env.workdir / "malformed"
    ca = (
        ClusterCA.init(work / "ca")
        if not (work / "ca" / "ca.pem").exists()
        else ClusterCA.load(work / "ca")
    )
    creds = ca.issue_host("fuzzer", work / "fuzzer")
    ident = LocalIdentity(name="fuzzer", cert_der=creds.cert_der(), private_key=creds.load_key())
    hs = ClientHandshake(
        identity=ident,
        server_name=HONEST,
        migration_id=os.urandom(16),
        n_streams=1,
        verify_peer=lambda der, name: None,
    )
    return hs.start()


def _frames(hello: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for i in range(FRAMES):
        kind = i % 6
        if kind == 0:
            out.append(("random", rng.randbytes(rng.randrange(1, 4096))))
        elif kind == 1:
            m = bytearray(hello)
            for _ in range(rng.randrange(1, 8)):
                m[rng.randrange(len(m))] ^= 1 << rng.randrange(8)
            out.append(("mutated hello", bytes(m)))
        elif kind == 2:
            out.append(("truncated hello", hello[: rng.randrange(1, len(hello))]))
        elif kind == 3:
            out.append(("oversized length", struct.pack(">I", 0xFFFFFFF0) + hello[4:64]))
        elif kind == 4:
            out.append(("hello + junk", hello + rng.randbytes(rng.randrange(1, 65536))))
        else:
            out.append(("control junk", rng.randbytes(rng.randrange(1, 2048))))
    return out


async def _throw(
    host: str, port: int, data: bytes, deadline_s: float, source: str | None = None
) -> tuple[str, float]:
    t0 = time.monotonic()
    local = (source, 0) if source else None
    try:
        opening = asyncio.open_connection(host, port, local_addr=local)
        r, w = await asyncio.wait_for(opening, 5)
    except (OSError, TimeoutError):
        return "refused", 0.0
    try:
        w.write(data)
        await w.drain()
        async with asyncio.timeout(deadline_s):
            while await r.read(65536):
                pass
        return "closed", time.monotonic() - t0
    except TimeoutError:
        return "hung", time.monotonic() - t0
    except OSError:
        return "reset", time.monotonic() - t0
    finally:
        w.transport.abort()


async def trustmig(env: LabEnv) -> Outcome:
    t = env.trustmig
    hh = t.cluster.hosts[HONEST]
    assert hh.pid is not None
    host, dport = hh.data_listen.rsplit(":", 1)
    cport = int(hh.control.rsplit(":", 1)[1])
    frames = _frames(_client_hello(env), random.Random(SEED))
    before = await t.host_status(HONEST)
    deadline = 5.0 + HANG_GRACE_S  # the agent's handshake deadline is 5 s
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(kind: str, data: bytes) -> tuple[str, float]:
        async with sem:
            if kind == "control junk":  # the control port budgets by address: the attacker's
                return await _throw(host, cport, data, deadline, CONTROL_ATTACKER)
            # the data port's gate judges proof, not addresses: thrown from the peers' own
            return await _throw(host, int(dport), data, deadline)

    with RssSampler(hh.pid, interval_ms=50) as rss:
        results = await asyncio.gather(*(one(k, d) for k, d in frames))
    alive = os.path.exists(f"/proc/{hh.pid}")
    try:
        after = await t.host_status(HONEST)
        responsive = True
    except Exception:
        after, responsive = before, False
    mem = rss.stats()
    outcomes: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, _), (o, _) in zip(frames, results, strict=True):
        outcomes[o] = outcomes.get(o, 0) + 1
        by_kind.setdefault(kind, {})[o] = by_kind.setdefault(kind, {}).get(o, 0) + 1
    longest = max((d for _, d in results), default=0.0)
    new_incoming = len(after["incoming"]) - len(before["incoming"])
    grew_mib = (mem.max_kib - mem.first_kib) / 1024
    return Outcome(
        compromised=not alive
        or not responsive
        or outcomes.get("hung", 0) > 0
        or new_incoming > 0
        or grew_mib > 64,
        outcome=f"{len(frames)} malformed inputs: {outcomes}; agent alive={alive}, answering="
        f"{responsive}, RSS +{grew_mib:.1f} MiB, longest connection {longest:.1f} s",
        evidence={
            "inputs": len(frames),
            "outcomes": outcomes,
            "by_kind": by_kind,
            "agent_alive": alive,
            "agent_responsive": responsive,
            "rss_growth_mib": round(grew_mib, 1),
            "longest_connection_s": round(longest, 2),
            "new_incoming": new_incoming,
        },
        guest=None,
    )


ATTACK = Attack(
    name=NAME,
    title="Malformed stream (migration module loopholes)",
    paper="Bugs in the migration module are exploited with crafted input: crashes, hangs or "
    "corrupted state accepted by the receiving hypervisor.",
    x805=(
        ("availability", "infrastructure", "end_user"),
        ("data_integrity", "infrastructure", "end_user"),
        ("availability", "services", "control"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
