"""Fixtures: per-test swtpm hosts in tmp dirs, always stopped; a signed reference-value set."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.attest.swtpm import open_tpm
from trustmig.attest.tpm import HostTpm

TpmFactory = Callable[[str], HostTpm]


@pytest.fixture
def vendor_ca_dir(tmp_path: Path) -> Path:
    """One simulated TPM manufacturer CA shared by all hosts of a test."""
    return tmp_path / "vendor-ca"


@pytest.fixture
def tpm_factory(tmp_path: Path, vendor_ca_dir: Path) -> Iterator[TpmFactory]:
    opened: list[HostTpm] = []

    def make(host: str) -> HostTpm:
        tpm = open_tpm(tmp_path / host, prefer_device=False, ca_dir=vendor_ca_dir)
        opened.append(tpm)
        return tpm

    try:
        yield make
    finally:
        for tpm in opened:
            tpm.close()


@pytest.fixture
def admin_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())
