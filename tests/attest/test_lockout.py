"""Unclean stops of the TPM never lock a host out of its own sealed keys."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from trustmig.attest.swtpm import open_tpm

pytestmark = pytest.mark.tpm


def _kill_unclean(tpm) -> None:  # type: ignore[no-untyped-def]
    """A power cut for the TPM: no TPM2_Shutdown, the process is killed."""
    proc = tpm._process._proc
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tpm._closed = True


def test_sealed_key_survives_many_unclean_tpm_stops(tmp_path: Path) -> None:
    tpm = open_tpm(tmp_path, prefer_device=False)
    blob = tpm.seal(b"k" * 32, [16])
    counters = []
    try:
        for _ in range(6):
            _kill_unclean(tpm)
            tpm = open_tpm(tmp_path, prefer_device=False)
            assert tpm.unseal(blob) == b"k" * 32
            counters.append(tpm.lockout_counter())
    finally:
        tpm.close()
    assert counters == [0] * 6, "no failure may accumulate towards a lockout"
