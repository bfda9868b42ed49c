from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from trustmig.attest.errors import AttestError
from trustmig.attest.measure import (
    EventLog,
    MeasurementEvent,
    measure_file,
    measure_package,
    measured_launch,
)

from .conftest import TpmFactory


def _pkg(root: Path) -> Path:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / "pkg" / "sub" / "data.txt").write_text("data\n")
    return root / "pkg"


def test_measure_package_ignores_bytecode_and_tracks_content(tmp_path: Path) -> None:
    pkg = _pkg(tmp_path)
    first = measure_package(pkg)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\x00" * 10)
    (pkg / "stray.pyc").write_bytes(b"\x01")
    assert measure_package(pkg) == first
    (pkg / "sub" / "data.txt").write_text("changed\n")
    assert measure_package(pkg) != first
    assert measure_file(pkg / "__init__.py") == hashlib.sha256(b"x = 1\n").digest()
    with pytest.raises(AttestError, match="not a directory"):
        measure_package(tmp_path / "nope")
    with pytest.raises(AttestError, match="cannot measure"):
        measure_file(tmp_path / "nope")


def test_event_log_replay_and_json() -> None:
    d1, d2 = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    log = EventLog(
        [
            MeasurementEvent(11, "qemu-binary", d1, "/q"),
            MeasurementEvent(12, "agent-config", d2, "/c"),
        ]
    )
    expected11 = hashlib.sha256(bytes(32) + d1).digest()
    assert log.replay() == {11: expected11, 12: hashlib.sha256(bytes(32) + d2).digest()}
    assert EventLog.from_json(log.to_json()) == log
    with pytest.raises(AttestError, match="malformed event log"):
        EventLog.from_json('{"format": "trustmig-eventlog/1", "bank": "sha256", "events": [{}]}')
    with pytest.raises(AttestError, match="not valid JSON"):
        EventLog.from_json("{")


@pytest.mark.tpm
def test_measured_launch_extends_once_per_boot(tpm_factory: TpmFactory, tmp_path: Path) -> None:
    tpm = tpm_factory("host-a")
    items = [
        ("qemu-binary", hashlib.sha256(b"qemu").digest(), "/usr/bin/qemu"),
        ("agent-config", hashlib.sha256(b"cfg").digest(), "/etc/trustmig/host.toml"),
    ]
    log_path = tmp_path / "launch.json"
    log = measured_launch(tpm, items, log_path)
    pcrs = tpm.pcr_read([11, 12, 13])
    assert log.replay() == {11: pcrs[11], 12: pcrs[12]}
    assert pcrs[13] == bytes(32)
    # Agent restart in the same boot: nothing is extended twice.
    again = measured_launch(tpm, items, log_path)
    assert again == log and tpm.pcr_read([11, 12, 13]) == pcrs
    # A new policy bundle is appended.
    more = measured_launch(tpm, [*items, ("policy-bundle", bytes(32), "p")], log_path)
    assert len(more.events) == 3 and more.replay()[13] == tpm.pcr_read([13])[13]
    # PCRs the log cannot explain: refuse.
    log_path.unlink()
    with pytest.raises(AttestError, match="already hold measurements"):
        measured_launch(tpm, items, log_path)
    with pytest.raises(AttestError, match="has no PCR"):
        measured_launch(tpm, [("bios", bytes(32), "")], log_path)
