"""Microbenchmark of the channel record layer: seal_into / open_into throughput in MB/s.

Runs a single thread for about half a second per case (the machine is shared) and prints one
JSON object. Usage: .venv/bin/python benchmarks/channel_records.py [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from trustmig.channel import RecordLimits, SessionKeys


def bench(cipher: str, size: int, seconds: float) -> dict[str, float | int | str]:
    session = SessionKeys(
        master_secret=os.urandom(32),
        cipher=cipher,
        n_streams=1,
        limits=RecordLimits(max_plaintext=max(size, 256 * 1024)),
    )
    sealer, opener = session.sealer(0, "c2s"), session.opener(0, "c2s")
    payload = memoryview(os.urandom(size))
    # pre-seal a batch so the open loop measures opening only
    records: list[bytes] = []
    out = bytearray(sealer.sealed_size(size))
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        m = sealer.seal_into(payload, out)
        if len(records) < 64:
            records.append(bytes(out[:m]))
        n += 1
    seal_s = time.perf_counter() - start
    plain = bytearray(size)
    pview = memoryview(plain)
    hsize = opener.HEADER_SIZE
    opened = 0
    start = time.perf_counter()
    for rec in records:  # same order as sealed: sequence numbers match
        view = memoryview(rec)
        opener.open_into(view[:hsize], view[hsize:], pview)
        opened += 1
    # keep opening fresh records until the time is up (sealing one, opening one)
    t_open = time.perf_counter() - start
    sealer2, opener2 = session.sealer(0, "s2c"), session.opener(0, "s2c")
    while t_open < seconds:
        m = sealer2.seal_into(payload, out)
        view = memoryview(out)[:m]
        t0 = time.perf_counter()
        opener2.open_into(view[:hsize], view[hsize:], pview)
        t_open += time.perf_counter() - t0
        opened += 1
    mb = size / 1e6
    return {
        "cipher": cipher,
        "record_bytes": size,
        "seal_into_MBps": round(n * mb / seal_s, 1),
        "open_into_MBps": round(opened * mb / t_open, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args()
    results = [
        bench(cipher, size, args.seconds)
        for cipher in ("aes-256-gcm", "chacha20-poly1305")
        for size in (64 * 1024, 256 * 1024)
    ]
    print(json.dumps({"benchmark": "channel_records", "results": results}, indent=2))


if __name__ == "__main__":
    main()
