"""What one local hop costs: a writer process and a reader process move bytes through a unix
stream socket or a pipe, as QEMU and trustmig's relay do (QEMU writes its migration stream in
writes of about 32 KiB; the relay reads up to a record's 256 KiB). Reports each end's CPU
seconds per GiB (its own ``getrusage``) and the throughput, best of N, as JSON.

This is the floor under any design in which a process other than QEMU encrypts the stream:
every byte crosses one such hop on each host.

Usage: .venv/bin/python benchmarks/socket_hop.py [--gib 1] [--runs 3] [--write-kib 32]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import socket
import time
from typing import Any

GIB = 1 << 30
F_SETPIPE_SZ = 1031
READ_BYTES = 256 * 1024


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _ends(kind: str) -> tuple[int, int, list[Any]]:
    """(read fd, write fd, objects to keep alive) of a fresh hop."""
    if kind == "unix":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return b.fileno(), a.fileno(), [a, b]
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    return r, w, []


def _write_all(fd: int, total: int, write_bytes: int) -> None:
    chunk = memoryview(os.urandom(write_bytes))
    sent = 0
    while sent < total:
        sent += os.write(fd, chunk[: min(write_bytes, total - sent)])


def one(kind: str, total: int, write_bytes: int) -> dict[str, float]:
    """One run; raises RuntimeError if the reader did not get every byte."""
    rfd, wfd, keep = _ends(kind)
    pid = os.fork()
    if pid == 0:  # the writer (QEMU's part)
        try:
            _write_all(wfd, total, write_bytes)
        finally:
            os._exit(0)
    os.close(wfd)
    buf = memoryview(bytearray(READ_BYTES))
    cpu0, t0, got = _cpu_s(), time.perf_counter(), 0
    while n := os.readv(rfd, [buf]):
        got += n
    wall, reader_cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    _, _, ru = os.wait4(pid, 0)
    os.close(rfd)
    del keep
    if got != total:
        raise RuntimeError(f"{kind}: read {got} of {total} bytes")
    gib = total / GIB
    return {
        "gbps": round(total / wall / 1e9, 2),
        "writer_cpu_s_per_gib": round((ru.ru_utime + ru.ru_stime) / gib, 3),
        "reader_cpu_s_per_gib": round(reader_cpu / gib, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--write-kib", type=int, default=32)
    args = ap.parse_args()
    total, write_bytes = int(args.gib * GIB), args.write_kib * 1024
    report: dict[str, Any] = {"gib": args.gib, "write_bytes": write_bytes,
                              "read_bytes": READ_BYTES}  # fmt: skip
    for kind in ("unix", "pipe"):
        runs = [one(kind, total, write_bytes) for _ in range(args.runs)]
        best = min(runs, key=lambda r: r["writer_cpu_s_per_gib"] + r["reader_cpu_s_per_gib"])
        hop = round(best["writer_cpu_s_per_gib"] + best["reader_cpu_s_per_gib"], 3)
        report[kind] = {**best, "hop_cpu_s_per_gib": hop, "runs": runs}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
