"""Latency of attestation bound to a channel handshake: make_evidence (TPM quote) and
verify_evidence (pure Python), median over N runs on one swtpm host. Prints JSON.

Usage: .venv/bin/python benchmarks/attest_latency.py [--runs 50]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.attest.enroll import AkRegistry, enroll_host
from trustmig.attest.evidence import make_evidence, verify_evidence
from trustmig.attest.measure import launch_items, measured_launch
from trustmig.attest.refvalues import RefValues
from trustmig.attest.swtpm import open_tpm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="trustmig-attest-bench-") as d:
        root = Path(d)
        t = time.perf_counter()
        tpm = open_tpm(root / "host", prefer_device=False)
        open_ms = (time.perf_counter() - t) * 1e3
        try:
            t = time.perf_counter()
            enroll_host("bench-host", tpm, root / "registry.json")
            enroll_ms = (time.perf_counter() - t) * 1e3
            qemu, cfg = root / "qemu", root / "host.toml"
            qemu.write_bytes(b"qemu" * 1000)
            cfg.write_text('name = "bench-host"\n')
            items = launch_items(qemu, cfg)
            t = time.perf_counter()
            log = measured_launch(tpm, items, root / "launch.json")
            launch_ms = (time.perf_counter() - t) * 1e3
            key = ec.generate_private_key(ec.SECP256R1())
            rv = RefValues()
            for name, digest, detail in items:
                rv.add(name, digest, detail)
            rv.save(root / "ref.json", key)
            refs = RefValues.load(root / "ref.json", key.public_key())
            registry = AkRegistry.load(root / "registry.json")
            make, verify = [], []
            for i in range(args.runs):
                th = hashlib.sha256(os.urandom(32) + i.to_bytes(4, "big")).digest()
                t0 = time.perf_counter()
                ev = make_evidence(tpm, th, log, host="bench-host")
                t1 = time.perf_counter()
                verify_evidence(
                    ev,
                    peer_name="bench-host",
                    transcript_hash=th,
                    registry=registry,
                    refvalues=refs,
                )
                t2 = time.perf_counter()
                make.append((t1 - t0) * 1e3)
                verify.append((t2 - t1) * 1e3)
            key_blob = tpm.seal(os.urandom(32), [11, 12, 13])
            t = time.perf_counter()
            tpm.unseal(key_blob)
            unseal_ms = (time.perf_counter() - t) * 1e3
        finally:
            tpm.close()
    print(
        json.dumps(
            {
                "runs": args.runs,
                "make_evidence_ms_median": round(statistics.median(make), 3),
                "verify_evidence_ms_median": round(statistics.median(verify), 3),
                "make_plus_verify_ms_median": round(
                    statistics.median(m + v for m, v in zip(make, verify, strict=True)), 3
                ),
                "evidence_bytes": len(ev),
                "swtpm_open_ms": round(open_ms, 1),
                "enroll_ms": round(enroll_ms, 1),
                "measured_launch_ms": round(launch_ms, 1),
                "unseal_ms": round(unseal_ms, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
