"""Measured launch: hash the software a host runs, extend PCRs and keep a TCG-style event log.

The TPM only keeps a running hash per PCR; the event log says *what* was extended, so a verifier
can replay it, check it ends at the quoted PCR values, and judge each measurement against the
reference values. PCR assignment (see docs/attestation.md):

- PCR 11: trustmig software (QEMU binary, trustmig package)
- PCR 12: agent configuration
- PCR 13: policy bundle

These are locality-0, *non-resettable* PCRs: software cannot roll them back except by a reboot
(or, for swtpm, a restart, which is the simulated reboot). PCRs 16 and 23 are resettable by any
process and would let a compromised host reset and replay good values, so they are never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustmig.attest.errors import AttestError
from trustmig.attest.tpm import HostTpm
from trustmig.attest.tpmwire import extend_value

PCR_MAP: dict[str, int] = {
    "qemu-binary": 11,
    "trustmig-package": 11,
    "agent-config": 12,
    "policy-bundle": 13,
    "host-capacity": 13,
}
#: Events that record data rather than software: their digest is ``data_event_digest`` of the
#: event's detail text, so a verifier reads the value from the log (checked against the quoted
#: PCRs) instead of looking it up in the reference values. The digest is domain-separated by the
#: event name, so a software measurement can never pass for a data event. In PCR 13, which keys
#: are not sealed to: a host whose memory changes must not lose its keys.
DATA_EVENTS: frozenset[str] = frozenset({"host-capacity"})
#: Software measurements every trustmig host's log must contain (in addition to data events).
REQUIRED_EVENTS: frozenset[str] = frozenset(
    {"qemu-binary", "trustmig-package", "agent-config", "policy-bundle"}
)


def data_event_digest(name: str, detail: str) -> bytes:
    """sha256 over a domain tag, the event name and its detail (see ``DATA_EVENTS``)."""
    return hashlib.sha256(
        b"trustmig-data-event\0" + name.encode() + b"\0" + detail.encode()
    ).digest()


LAUNCH_PCRS: tuple[int, ...] = (11, 12, 13)
LOG_FORMAT = "trustmig-eventlog/1"
_ZERO = bytes(32)


@dataclass(frozen=True)
class MeasurementEvent:
    """One extend: `digest` (sha256 of the component) went into `pcr`."""

    pcr: int
    name: str
    digest: bytes
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "pcr": self.pcr,
            "name": self.name,
            "digest": self.digest.hex(),
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MeasurementEvent:
        pcr, name, detail = d["pcr"], d["name"], d["detail"]
        digest = bytes.fromhex(d["digest"])
        if not isinstance(pcr, int) or not 0 <= pcr <= 23:
            raise ValueError(f"pcr {pcr!r} out of range")
        if not isinstance(name, str) or not isinstance(detail, str) or len(digest) != 32:
            raise ValueError("name/detail must be strings and digest 32 bytes")
        return cls(pcr=pcr, name=name, digest=digest, detail=detail)


@dataclass
class EventLog:
    """Ordered list of measurement events since the PCRs were last reset (host boot)."""

    events: list[MeasurementEvent] = field(default_factory=list)

    def replay(self) -> dict[int, bytes]:
        """PCR values the events produce when extended from zero, for each PCR they touch."""
        pcrs: dict[int, bytes] = {}
        for ev in self.events:
            pcrs[ev.pcr] = extend_value(pcrs.get(ev.pcr, _ZERO), ev.digest)
        return pcrs

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LOG_FORMAT,
            "bank": "sha256",
            "events": [e.to_dict() for e in self.events],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EventLog:
        try:
            if data.get("format") != LOG_FORMAT or data.get("bank") != "sha256":
                raise ValueError(f"format is not {LOG_FORMAT}/sha256")
            return cls([MeasurementEvent.from_dict(e) for e in data["events"]])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AttestError(
                f"malformed event log ({exc}); send the log written by measured_launch"
            ) from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> EventLog:
        try:
            data = json.loads(text)
        except ValueError:
            raise AttestError(
                "event log is not valid JSON; send the log written by measured_launch"
            ) from None
        if not isinstance(data, dict):
            raise AttestError(
                "event log JSON is not an object; send the log written by measured_launch"
            )
        return cls.from_dict(data)


def measure_file(path: Path) -> bytes:
    """sha256 of a file's content (streamed, so a large QEMU binary costs no memory)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise AttestError(f"cannot measure {path} ({exc.strerror}); check the path") from None
    return h.digest()


def _package_files(pkg_dir: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(pkg_dir):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith((".pyc", ".pyo")):
                continue
            p = Path(root) / name
            if p.is_file():
                yield p


def measure_package(pkg_dir: Path) -> bytes:
    """Digest of an installed Python package: sha256 over the sorted (relative path, sha256 of
    content) pairs of its source and data files, ignoring byte-code caches (which vary between
    runs without changing the code)."""
    pkg_dir = Path(pkg_dir)
    if not pkg_dir.is_dir():
        raise AttestError(
            f"cannot measure package {pkg_dir}: not a directory; pass the package dir"
        )
    entries = sorted(
        (p.relative_to(pkg_dir).as_posix(), measure_file(p)) for p in _package_files(pkg_dir)
    )
    h = hashlib.sha256()
    for rel, digest in entries:
        h.update(rel.encode() + b"\0" + digest)
    return h.digest()


def launch_items(
    qemu_binary: Path,
    agent_config: Path,
    policy_bundle: Path | None = None,
    trustmig_dir: Path | None = None,
) -> list[tuple[str, bytes, str]]:
    """The standard measured items of a trustmig host, ready for `measured_launch`."""
    pkg = trustmig_dir or Path(__file__).resolve().parent.parent
    items = [
        ("qemu-binary", measure_file(qemu_binary), str(qemu_binary)),
        ("trustmig-package", measure_package(pkg), str(pkg)),
        ("agent-config", measure_file(agent_config), str(agent_config)),
    ]
    if policy_bundle is not None:
        items.append(("policy-bundle", measure_file(policy_bundle), str(policy_bundle)))
    return items


def _write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(data)
    os.replace(tmp, path)


def measured_launch(
    tpm: HostTpm,
    items: Sequence[tuple[str, bytes, str]],
    log_path: Path,
    *,
    pcr_map: Mapping[str, int] = PCR_MAP,
) -> EventLog:
    """Extend each (name, sha256 digest, detail) item into its PCR and write the event log.

    Idempotent within one boot: if `log_path` already replays to the current PCR values, items
    already in it are not extended again; new or changed items are appended (a changed component
    shows up as a second event, which the verifier judges on its own). If the PCRs hold values the
    log cannot explain, the launch is refused rather than producing a log that never verifies.
    """
    for name, digest, _ in items:
        if name not in pcr_map:
            raise AttestError(f"measurement {name!r} has no PCR; add it to the PCR map")
        if len(digest) != 32:
            raise AttestError(f"measurement {name!r} digest is {len(digest)} bytes; pass sha256")
    pcrs = sorted(set(pcr_map.values()))
    current = tpm.pcr_read(pcrs)
    log = EventLog()
    if log_path.exists():
        previous = EventLog.from_json(log_path.read_bytes())
        replayed = previous.replay()
        if all(current[p] == replayed.get(p, _ZERO) for p in pcrs):
            log = previous
    if not log.events and any(v != _ZERO for v in current.values()):
        raise AttestError(
            f"PCRs {pcrs} already hold measurements not in {log_path}; reboot the host (restart "
            "its swtpm) to measure from a clean state"
        )
    have = {(e.name, e.digest) for e in log.events}
    for name, digest, detail in items:
        if (name, digest) in have:
            continue
        pcr = pcr_map[name]
        tpm.extend(pcr, digest)
        log.events.append(MeasurementEvent(pcr=pcr, name=name, digest=digest, detail=detail))
        have.add((name, digest))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(log_path, log.to_json())
    return log
