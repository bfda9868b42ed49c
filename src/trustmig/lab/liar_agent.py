"""A compromised agent that advertises resources it does not have (attack lab only).

It runs the genuine, measured trustmig software (so its attestation passes: the compromise is
at run time, e.g. a patched process in memory), but every resource claim and every measured-load
report it signs states ``LIE_FACTOR`` times its real capacity, all of it free. Start it like the
real agent: ``python -m trustmig.lab.liar_agent agent --config host.toml``.
"""

from __future__ import annotations

import dataclasses
import sys

from trustmig.agent import capacity, host_report
from trustmig.config import HostConfig
from trustmig.guard.claims import ResourceClaim
from trustmig.guard.reports import HostReport, VmUse

LIE_FACTOR = 8
_honest = capacity.current_claim
_honest_report = host_report.current_report


def inflated_claim(cfg: HostConfig, used: tuple[int, int], nonce: str) -> ResourceClaim:
    real = _honest(cfg, used, nonce)
    return dataclasses.replace(
        real,
        total_mem_mib=real.total_mem_mib * LIE_FACTOR,
        free_mem_mib=real.total_mem_mib * LIE_FACTOR,
        total_vcpus=real.total_vcpus * LIE_FACTOR,
        free_vcpus=real.total_vcpus * LIE_FACTOR,
        load=0.0,
    )


def inflated_report(cfg: HostConfig, guests: list[VmUse], nonce: str) -> HostReport:
    """The measured-load report a balancer reads: capacity inflated, its guests hidden."""
    real = _honest_report(cfg, guests, nonce)
    return dataclasses.replace(
        real,
        total_mem_mib=real.total_mem_mib * LIE_FACTOR,
        total_vcpus=real.total_vcpus * LIE_FACTOR,
        host_cpu_cores=0.0,
        vms=(),
    )


def main() -> None:
    capacity.current_claim = inflated_claim
    host_report.current_report = inflated_report
    from trustmig.cli.main import app

    sys.argv[0] = "trustmig"
    app()


if __name__ == "__main__":
    main()
