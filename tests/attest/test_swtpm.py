from __future__ import annotations

import os
from pathlib import Path

import pytest

from trustmig.attest.errors import AttestError, TpmUnavailable
from trustmig.attest.swtpm import SwtpmProcess, open_tpm
from trustmig.attest.tpm import HostTpm

pytestmark = pytest.mark.tpm


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_swtpm_process_lifecycle(tmp_path: Path) -> None:
    proc = SwtpmProcess(tmp_path / "h")
    with proc:
        assert proc.is_running()
        pid = proc.pid
        assert pid is not None and _alive(pid)
        assert proc.tcti == f"swtpm:host=127.0.0.1,port={proc.port}"
        assert proc.ctrl_port == proc.port + 1
        assert (proc.nvram_dir / "tpm2-00.permall").exists()
        assert proc.manufacturer_ca_cert.exists()
    assert not proc.is_running()
    assert not _alive(pid)
    with pytest.raises(TpmUnavailable, match="not running"):
        _ = proc.tcti


def test_state_survives_restart_but_pcrs_reset(tmp_path: Path) -> None:
    """Same state dir = same host identity; each start is a reboot (PCRs back to zero)."""
    tpm = open_tpm(tmp_path, prefer_device=False)
    try:
        keys = tpm.ensure_keys()
        tpm.extend(11, b"\x01" * 32)
        assert tpm.pcr_read([11])[11] != bytes(32)
    finally:
        tpm.close()
    tpm = open_tpm(tmp_path, prefer_device=False)
    try:
        assert tpm.kind == "swtpm"
        assert tpm.ensure_keys() == keys
        assert tpm.pcr_read([11])[11] == bytes(32)
    finally:
        tpm.close()


def test_closed_tpm_and_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    tpm = open_tpm(tmp_path, prefer_device=False)
    try:
        with pytest.raises(AttestError, match="32-byte sha256"):
            tpm.extend(11, b"short")
        with pytest.raises(AttestError, match="out of range"):
            tpm.pcr_read([24])
        with pytest.raises(AttestError, match="qualifying data is 65 bytes"):
            tpm.quote(b"x" * 65, [11])
        with pytest.raises(AttestError, match="only 16 and 23"):
            tpm.reset_pcr(11)
    finally:
        tpm.close()
    assert isinstance(tpm, HostTpm)
    with pytest.raises(AttestError, match="closed"):
        tpm.pcr_read([11])
