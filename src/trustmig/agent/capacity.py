"""Host capacity: measured at launch, advertised in signed claims, checked by the source.

A destination tells the source how much it can still hold in a *resource claim* signed with its
host identity key and stamped with the migration id as nonce. Its total capacity is also
extended into PCR 13 at launch (a ``host-capacity`` data event over the JSON),
so the source can read the *attested* capacity from the quote's event log and refuse claims
that exceed it: a compromised destination that inflates its free resources to attract VMs is
caught and quarantined (see ``trustmig.guard.claims``).
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import asdict
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.attest.measure import data_event_digest
from trustmig.config import HostConfig
from trustmig.guard.claims import AttestedCapacity, ResourceClaim, sign_claim

EVENT_NAME = "host-capacity"


def _mem_total_mib() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("/proc/meminfo has no MemTotal line; set [capacity] mem_mib")


def host_capacity(cfg: HostConfig) -> AttestedCapacity:
    """The host's total capacity: from ``[capacity]`` in the config, else from the machine."""
    mem = cfg.capacity.mem_mib if cfg.capacity.mem_mib is not None else _mem_total_mib()
    cpus = cfg.capacity.vcpus if cfg.capacity.vcpus is not None else (os.cpu_count() or 1)
    return AttestedCapacity(mem_mib=mem, vcpus=cpus)


def capacity_detail(cap: AttestedCapacity) -> str:
    return json.dumps({"mem_mib": cap.mem_mib, "vcpus": cap.vcpus}, sort_keys=True,
                      separators=(",", ":"))  # fmt: skip


def capacity_measurement(cfg: HostConfig) -> tuple[str, bytes, str]:
    """The (name, digest, detail) launch item that puts the capacity into PCR 13."""
    detail = capacity_detail(host_capacity(cfg))
    return EVENT_NAME, data_event_digest(EVENT_NAME, detail), detail


def parse_capacity(detail: str | None) -> AttestedCapacity | None:
    """The capacity from an attested ``host-capacity`` event detail (None if absent/bad)."""
    if not detail:
        return None
    try:
        doc = json.loads(detail)
        mem, cpus = doc["mem_mib"], doc["vcpus"]
    except (ValueError, KeyError, TypeError):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (mem, cpus)):
        return None
    return AttestedCapacity(mem_mib=mem, vcpus=cpus)


def _load() -> float:
    try:
        return min(1.0, max(0.0, os.getloadavg()[0] / (os.cpu_count() or 1)))
    except OSError:
        return 0.0


def current_claim(cfg: HostConfig, used: tuple[int, int], nonce: str) -> ResourceClaim:
    """What this host honestly has free right now (before the arriving VM is counted).

    ``used``: memory (MiB) and vCPUs of the guests that run or arrive here."""
    cap = host_capacity(cfg)
    mem, cpus = used
    return ResourceClaim(
        host=cfg.name,
        free_mem_mib=max(0, cap.mem_mib - mem),
        free_vcpus=max(0, cap.vcpus - cpus),
        load=round(_load(), 3),
        total_mem_mib=cap.mem_mib,
        total_vcpus=cap.vcpus,
        ts=time.time(),
        nonce=nonce,
    )


def signed_claim(claim: ResourceClaim, key: object) -> dict[str, Any]:
    """The claim as sent in ``incoming.prepare``'s answer (signed with the host identity key)."""
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("resource claims are signed with the host's ECDSA identity key")
    return {"claim": asdict(claim), "signature": base64.b64encode(sign_claim(claim, key)).decode()}
