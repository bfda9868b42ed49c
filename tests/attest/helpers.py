"""Shared test setup: enroll a host, run its measured launch, sign reference values for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.attest.enroll import AkRegistry, enroll_host
from trustmig.attest.measure import EventLog, launch_items, measured_launch
from trustmig.attest.refvalues import RefValues
from trustmig.attest.tpm import HostTpm


@dataclass
class LaunchedHost:
    name: str
    tpm: HostTpm
    log: EventLog
    items: list[tuple[str, bytes, str]]


def launch_host(
    name: str, tpm: HostTpm, root: Path, registry_path: Path, qemu_content: bytes = b"qemu 7.2"
) -> LaunchedHost:
    hdir = root / f"{name}-files"
    hdir.mkdir(parents=True, exist_ok=True)
    qemu, cfg, pol = hdir / "qemu-system-x86_64", hdir / "host.toml", hdir / "policy.bundle"
    qemu.write_bytes(qemu_content)
    cfg.write_text(f'name = "{name}"\n')
    pol.write_text("allow: all\n")
    enroll_host(name, tpm, registry_path)
    items = launch_items(qemu, cfg, pol)
    log = measured_launch(tpm, items, hdir / "launch-log.json")
    return LaunchedHost(name, tpm, log, items)


def sign_refvalues(
    path: Path, key: ec.EllipticCurvePrivateKey, *hosts: LaunchedHost, skip: str | None = None
) -> RefValues:
    rv = RefValues()
    for h in hosts:
        for name, digest, detail in h.items:
            if name != skip:
                rv.add(name, digest, detail)
    rv.save(path, key)
    return RefValues.load(path, key.public_key())


def registry(path: Path) -> AkRegistry:
    return AkRegistry.load(path)
