"""Audit append throughput: 100k signed, hash-chained events into a temporary SQLite file.

Prints one JSON object: {"events_per_s", "checkpoint_every", "verify_events_per_s", ...}.
The append figure includes the final flush(), so every event counted is committed and signed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustmig.audit import AuditLog


def run(events: int, checkpoint_every: int) -> dict[str, object]:
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="trustmig-audit-bench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'audit.db'}"
        log = AuditLog(url, host="bench-host", signing_key=key, checkpoint_every=checkpoint_every)
        try:
            start = time.perf_counter()
            for i in range(events):
                log.append(
                    "migration.phase",
                    vm="vm1",
                    migration_id=f"m{i // 1000}",
                    user="alice",
                    data={"phase": "precopy", "i": i, "bytes": i * 4096},
                )
            log.flush()
            append_s = time.perf_counter() - start
        finally:
            log.close()
        reader = AuditLog(url, host="bench-host", signing_key=None)
        try:
            start = time.perf_counter()
            report = reader.verify(key.public_key(), strict=True)
            verify_s = time.perf_counter() - start
        finally:
            reader.close()
    if not report.ok or report.events != events:
        raise SystemExit(f"verification failed: {report.problems[:3]}")
    return {
        "events": events,
        "events_per_s": round(events / append_s),
        "checkpoint_every": checkpoint_every,
        "checkpoints": report.checkpoints,
        "verify_events_per_s": round(events / verify_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--checkpoint-every", type=int, default=256)
    args = parser.parse_args()
    print(json.dumps(run(args.events, args.checkpoint_every)))


if __name__ == "__main__":
    main()
