"""`trustmig bench relay`: one stream through the channel's pumps alone, no QEMU, no agents.

What the data path can carry per core when QEMU is not competing for it: a writer process feeds
a sealing pump over a unix socket (as QEMU feeds the source relay), the pump sends records over
loopback TCP to an opening pump in a second process, which hands the plaintext to a reader over a
unix socket (as the destination relay feeds QEMU). Each side's CPU is its process's own
(``getrusage``), so the figure is CPU seconds per GiB for each pump with its feeder. The baseline
in the same invocation is the same bytes over one plain TCP connection between the two processes
(QEMU's direct migration has exactly that hop), so ``relay_cpu_s_per_gib_added`` is what the
relays cost beyond it, to be read against the cipher's own cost (:mod:`trustmig.bench.cipher`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import resource
import socket
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

from trustmig.bench.cipher import GIB, measure_cipher_cost
from trustmig.channel import RecordLimits, SessionKeys
from trustmig.channel.relay import StreamFailure, StreamPump, tune_tcp

#: QEMU's migration stream reaches the relay in writes of about this size (its QEMUFile buffer)
DEFAULT_WRITE_BYTES = 32 * 1024


@dataclass(frozen=True)
class RelaySide:
    """One process's figures: wall seconds and CPU seconds per GiB carried."""

    wall_s: float
    cpu_s_per_gib: float


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _writer(sock: socket.socket, total: int, write_bytes: int) -> None:
    chunk = memoryview(os.urandom(write_bytes))
    sent = 0
    while sent < total:
        n = min(write_bytes, total - sent)
        sock.sendall(chunk[:n])
        sent += n
    sock.shutdown(socket.SHUT_WR)


def _reader(sock: socket.socket) -> int:
    buf = memoryview(bytearray(1 << 20))
    got = 0
    while n := sock.recv_into(buf):
        got += n
    return got


def _pump(index: int, plain: socket.socket, wire: socket.socket, keys: SessionKeys,
          send: str, receive: str, failures: list[StreamFailure]) -> StreamPump:  # fmt: skip
    pump = StreamPump(index, plain, wire, keys.sealer(0, send), keys.opener(0, receive),
                      max_plaintext=keys.limits.max_plaintext,
                      on_failure=failures.append)  # fmt: skip
    pump.start()
    return pump


def _side(role: str, port: int, secret: bytes | None, total: int, write_bytes: int,
          out: Connection) -> None:  # fmt: skip
    """One process: connect (source) or accept (destination) the wire, run its pump if
    ``secret`` (else the plain baseline), report (wall s, CPU s, bytes, error)."""
    try:
        if role == "source":
            wire = socket.create_connection(("127.0.0.1", port))
        else:
            with socket.create_server(("127.0.0.1", port)) as srv:
                out.send(("listening",))
                wire, _ = srv.accept()
        tune_tcp(wire)
        cpu0, t0 = _cpu_s(), time.monotonic()
        carried = _carry(role, wire, secret, total, write_bytes)
        out.send((time.monotonic() - t0, _cpu_s() - cpu0, carried, None))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        out.send((0.0, 0.0, 0, f"{role}: {type(e).__name__}: {e}"))


def _carry(role: str, wire: socket.socket, secret: bytes | None, total: int,
           write_bytes: int) -> int:  # fmt: skip
    if secret is None:  # baseline: the feeder writes straight onto the wire
        if role == "source":
            _writer(wire, total, write_bytes)
            _reader(wire)
            return total
        got = _reader(wire)
        wire.shutdown(socket.SHUT_WR)
        return got
    keys = SessionKeys(master_secret=secret, cipher="aes-256-gcm", n_streams=1,
                       limits=RecordLimits())  # fmt: skip
    mine, feeder = socket.socketpair()
    failures: list[StreamFailure] = []
    send, receive = ("c2s", "s2c") if role == "source" else ("s2c", "c2s")
    pump = _pump(0, mine, wire, keys, send, receive, failures)
    if role == "source":
        t = threading.Thread(target=_writer, args=(feeder, total, write_bytes))
        t.start()
        _reader(feeder)  # ends when the destination ends its stream
        t.join()
        got = total
    else:
        got = _reader(feeder)
        feeder.shutdown(socket.SHUT_WR)
    pump.join(30)
    with contextlib.suppress(OSError):
        feeder.close()
    if failures:
        raise RuntimeError(failures[0].line())
    return got


def _answer(conn: Connection, proc: Any, what: str, timeout: float) -> Any:
    """The child's next message, or RuntimeError if it exits or stays silent."""
    if not conn.poll(timeout):
        state = "exited" if not proc.is_alive() else "is silent"
        raise RuntimeError(f"the relay benchmark's {what} {state} (exit code {proc.exitcode})")
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError(
            f"the relay benchmark's {what} died (exit code {proc.exitcode})"
        ) from None


def _one(secure: bool, total: int, write_bytes: int) -> tuple[RelaySide, RelaySide]:
    ctx = mp.get_context("fork")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    secret = os.urandom(32) if secure else None
    deadline = max(60.0, total / 50e6)  # far beyond 50 MB/s: a stuck run, not a slow one
    (src_r, src_w), (dst_r, dst_w) = ctx.Pipe(False), ctx.Pipe(False)
    procs = []
    try:
        dst = ctx.Process(target=_side, args=("destination", port, secret, total, write_bytes,
                                              dst_w))  # fmt: skip
        dst.start()
        procs.append(dst)
        dst_w.close()  # the child's end only: its death is then an EOF here
        first = _answer(dst_r, dst, "destination", 10)
        if first != ("listening",):
            raise RuntimeError(first[3] if len(first) == 4 else f"unexpected {first!r}")
        src = ctx.Process(target=_side, args=("source", port, secret, total, write_bytes, src_w))
        src.start()
        procs.append(src)
        src_w.close()
        sides = [_answer(src_r, src, "source", deadline), _answer(dst_r, dst, "destination", 30)]
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in (src_r, dst_r, src_w, dst_w):
            c.close()
    for _wall, _cpu, carried, error in sides:
        if error or carried != total:
            raise RuntimeError(error or f"carried {carried} of {total} bytes")
    gib = total / GIB
    src_side, dst_side = (RelaySide(round(w, 3), round(c / gib, 3)) for w, c, _, _ in sides)
    return src_side, dst_side


def run_relay_bench(
    total_mib: int = 1024, write_bytes: int = DEFAULT_WRITE_BYTES, repeat: int = 3
) -> dict[str, Any]:
    """Medians-free (best of ``repeat``: noise only adds) figures for the plain hop and the
    relayed stream; raises RuntimeError if a run fails to carry every byte."""
    total = total_mib << 20
    plain = [_one(False, total, write_bytes) for _ in range(repeat)]
    relay = [_one(True, total, write_bytes) for _ in range(repeat)]

    def best(runs: list[tuple[RelaySide, RelaySide]]) -> dict[str, Any]:
        wall = min(max(a.wall_s, b.wall_s) for a, b in runs)
        return {
            "gbps": round(total / 1e9 / wall, 2),
            "cpu_s_per_gib_source": min(a.cpu_s_per_gib for a, _ in runs),
            "cpu_s_per_gib_destination": min(b.cpu_s_per_gib for _, b in runs),
            "runs": [[asdict(a), asdict(b)] for a, b in runs],
        }

    p, r = best(plain), best(relay)
    cipher = measure_cipher_cost()
    added = round(r["cpu_s_per_gib_source"] + r["cpu_s_per_gib_destination"]
                  - p["cpu_s_per_gib_source"] - p["cpu_s_per_gib_destination"], 3)  # fmt: skip
    return {
        "config": {"total_mib": total_mib, "write_bytes": write_bytes, "repeat": repeat},
        "plain": p,
        "relay": r,
        "cipher": cipher.to_json(),
        "relay_gbps_per_core": round(r["gbps"], 2),
        "relay_cpu_s_per_gib_added": added,
        "relay_overhead_vs_cipher": round(added / cipher.both_sides_cpu_s_per_gib, 2),
    }
