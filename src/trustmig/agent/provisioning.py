"""Reference values and attestation file layout for hosts, local clusters and administrators.

The agent measures a fixed list of components at start (see docs/attestation.md): the QEMU binary
and the trustmig package (PCR 11), the agent's config file (PCR 12) and the policy bundle
(PCR 13). A verifier accepts a host only if every one of those digests is in the signed
reference values, so whoever provisions a cluster must compute *the same* digests the agent will
compute. This module is that single definition (`host_launch_items`), used both by the agent
(`trustmig.agent.attestation`) and by the tools that sign reference values (`provision_refvalues`,
`trustmig refvalues add --from-host-config`).

Local clusters share one AK registry and one reference-value file at the cluster root
(`cluster_attestation_paths`), so each simulated host sees the same trust data a real cluster's
hosts would get from their security admin.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

import trustmig
from trustmig.agent.capacity import capacity_measurement
from trustmig.attest.errors import AttestError
from trustmig.attest.measure import DATA_EVENTS, launch_items, measure_package
from trustmig.attest.refvalues import RefValue, RefValues
from trustmig.config import HostConfig
from trustmig.pki.authority import ClusterCA

#: File names of the shared trust data at the root of a local cluster.
REGISTRY_NAME = "ak-registry.json"
REFVALUES_NAME = "refvalues.json"

Measurement = tuple[str, str, str]  # (name, sha256 hex, detail)


class ProvisioningError(AttestError):
    """Reference values or host measurements could not be produced."""


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` + ``.lock``.

    Several agents (and the CLI) read-modify-write the same registry or reference-value file;
    the lock keeps one writer from silently dropping another one's change.
    """
    lock_path = Path(path).with_name(Path(path).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def resolve_qemu_binary(binary: str) -> Path:
    """The QEMU executable the agent will run (``qemu.binary`` looked up like the shell does)."""
    found = shutil.which(binary)
    if found is None:
        raise ProvisioningError(
            f"qemu binary {binary!r} (qemu.binary in host.toml) not found on PATH; "
            "install qemu-system-x86 or fix qemu.binary"
        )
    return Path(found).resolve()


def policy_bundle_digest(policy_dir: Path) -> bytes:
    """Deterministic sha256 of the policy directory (sorted relative paths + file digests).

    A missing directory is an empty bundle (sha256 of nothing), so a host without local
    policies still has a well-defined, approvable measurement.
    """
    if not Path(policy_dir).is_dir():
        return hashlib.sha256().digest()
    return measure_package(Path(policy_dir))


def trustmig_package_dir() -> Path:
    return Path(trustmig.__file__).resolve().parent


def config_measurement(cfg: HostConfig, config_path: Path) -> tuple[str, bytes, str]:
    """The agent config as measured: its trust-relevant settings only, canonical JSON."""
    doc = json.dumps(cfg.trust_relevant(), sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(b"trustmig-agent-config/1\0" + doc.encode()).digest()
    return ("agent-config", digest, f"{config_path} (trust-relevant settings)")


def host_launch_items(cfg: HostConfig, config_path: Path) -> list[tuple[str, bytes, str]]:
    """Exactly what the agent of ``cfg`` extends into its PCRs at start, in order."""
    config_path = Path(config_path).resolve()
    if not config_path.is_file():
        raise ProvisioningError(
            f"agent config {config_path} does not exist; pass the host.toml path"
        )
    items = [
        item if item[0] != "agent-config" else config_measurement(cfg, config_path)
        for item in launch_items(
            resolve_qemu_binary(cfg.qemu.binary), config_path, None, trustmig_package_dir()
        )
    ]
    items.append(("policy-bundle", policy_bundle_digest(cfg.policy_dir), str(cfg.policy_dir)))
    items.append(capacity_measurement(cfg))
    return items


def measure_host_software(cfg: HostConfig, config_path: Path) -> list[Measurement]:
    """The host's measurements as (name, sha256 hex, detail), e.g. for ``refvalues add``."""
    return [
        (n, d.hex(), detail)
        for n, d, detail in host_launch_items(cfg, config_path)
        if n not in DATA_EVENTS  # data, not software: read from the log, not approved
    ]


def load_refvalues(path: Path, verify_key: ec.EllipticCurvePublicKey) -> RefValues:
    """Load signed reference values; a missing file says how to create one."""
    if not Path(path).exists():
        raise ProvisioningError(
            f"reference values {path} do not exist; create them with 'trustmig refvalues add' "
            "(or 'trustmig refvalues add --from-host-config host.toml --ca-dir CA_DIR')"
        )
    return RefValues.load(path, verify_key)


def _load_or_empty(path: Path, signing_key: ec.EllipticCurvePrivateKey) -> RefValues:
    return RefValues.load(path, signing_key.public_key()) if Path(path).exists() else RefValues()


def add_refvalues(
    path: Path,
    signing_key: ec.EllipticCurvePrivateKey,
    entries: Sequence[Measurement],
) -> list[RefValue]:
    """Approve several (name, digest hex, comment) entries at once and re-sign the file."""
    with file_lock(path):
        rv = _load_or_empty(path, signing_key)
        added = [rv.add(name, digest, comment) for name, digest, comment in entries]
        rv.save(path, signing_key)
    return added


def add_refvalue(
    path: Path,
    signing_key: ec.EllipticCurvePrivateKey,
    name: str,
    digest_hex: str,
    comment: str = "",
) -> RefValue:
    """Approve one measurement (creating the signed file if needed)."""
    return add_refvalues(path, signing_key, [(name, digest_hex, comment)])[0]


def remove_refvalue(
    path: Path, signing_key: ec.EllipticCurvePrivateKey, name: str, digest_hex: str
) -> None:
    """Withdraw approval of one measurement and re-sign the file."""
    with file_lock(path):
        rv = load_refvalues(path, signing_key.public_key())
        rv.remove(name, digest_hex)
        rv.save(path, signing_key)


def provision_refvalues(
    ca: ClusterCA, path: Path, hosts: Sequence[tuple[HostConfig, Path]], *, merge: bool = True
) -> RefValues:
    """Sign reference values holding every measurement of every host (config, config path).

    With ``merge`` the entries of an existing file (verified with the CA key) are kept, so
    provisioning a new host does not withdraw approval from the others.
    """
    entries: list[Measurement] = []
    for cfg, config_path in hosts:
        for name, digest_hex, detail in measure_host_software(cfg, config_path):
            comment = f"{cfg.name}: {detail}" if name == "agent-config" else detail
            entries.append((name, digest_hex, comment))
    with file_lock(path):
        rv = _load_or_empty(path, ca.ca_key) if merge else RefValues()
        for name, digest_hex, comment in entries:
            rv.add(name, digest_hex, comment)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        rv.save(path, ca.ca_key)
    return rv


# ------------------------------------------------------------------ local cluster convention
def cluster_attestation_paths(root: Path) -> tuple[Path, Path]:
    """(AK registry, reference values) shared by all hosts of the local cluster at ``root``."""
    root = Path(root).resolve()
    return root / REGISTRY_NAME, root / REFVALUES_NAME


def cluster_attestation_toml(root: Path, *, tpm: str = "swtpm", auto_enroll: bool = True) -> str:
    """The ``[attestation]`` table a local-cluster host.toml needs to use the shared files."""
    registry, refvalues = cluster_attestation_paths(root)
    return (
        "[attestation]\n"
        "enabled = true\n"
        f'tpm = "{tpm}"\n'
        f'registry = "{registry}"\n'
        f'refvalues = "{refvalues}"\n'
        f"auto_enroll = {'true' if auto_enroll else 'false'}\n"
    )


def provision_cluster(ca: ClusterCA, root: Path, config_paths: Sequence[Path]) -> Path:
    """Sign the cluster's reference values for the hosts whose configs are given; returns the
    reference-value path. Call after the host.toml files are final: the config file is measured."""
    from trustmig.config import load_config

    _, refvalues = cluster_attestation_paths(root)
    provision_refvalues(ca, refvalues, [(load_config(p), Path(p)) for p in config_paths])
    return refvalues
