"""The agent's attestation component with real swtpm instances: two hosts sharing an AK registry
and CA-signed reference values, evidence bound to the transcript hash, sealed keys across agent
restarts, and an authorized upgrade through `trustmig host reseal`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer import Typer
from typer.testing import CliRunner

from trustmig.agent.attestation import (
    AgentAttestation,
    AgentAttestationError,
    decrypt_recovery,
    encrypt_recovery,
    offline_status,
)
from trustmig.agent.provisioning import (
    ProvisioningError,
    cluster_attestation_paths,
    cluster_attestation_toml,
    measure_host_software,
    provision_refvalues,
)
from trustmig.attest.enroll import AkRegistry
from trustmig.attest.errors import AttestationFailed, AttestError
from trustmig.attest.refvalues import RefValues
from trustmig.cli.attest_cmds import register
from trustmig.config import HostConfig, load_config
from trustmig.pki.authority import ClusterCA

UNSEAL_MSG = (
    "unseal refused: PCR state differs from the sealed launch (measured software changed); "
    "run 'trustmig host reseal' after an authorized upgrade"
)
HOSTS = ("host-a", "host-b")


def _qemu_source() -> bytes:
    found = shutil.which("qemu-system-x86_64")
    return Path(found).read_bytes() if found else b"\x7fELF qemu-system-x86_64 stand-in\n" * 64


@dataclass
class Lab:
    """A two-host trust domain in a tmp dir: CA, host dirs with host.toml, shared trust files."""

    root: Path
    ca: ClusterCA
    configs: dict[str, Path]
    opened: list[AgentAttestation] = field(default_factory=list)

    def cfg(self, host: str) -> HostConfig:
        return load_config(self.configs[host])

    def provision(self) -> None:
        _, refvalues = cluster_attestation_paths(self.root)
        provision_refvalues(self.ca, refvalues, [(self.cfg(h), self.configs[h]) for h in HOSTS])

    def start(self, host: str) -> AgentAttestation:
        att = AgentAttestation.start(
            self.cfg(host),
            ca_public_key=self.ca.ca_key.public_key(),
            config_path=self.configs[host],
        )
        self.opened.append(att)
        return att

    def stop(self, att: AgentAttestation) -> None:
        att.close()
        self.opened.remove(att)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    root = tmp_path / "cluster"
    root.mkdir()
    ca = ClusterCA.init(root / "ca")
    qemu = _qemu_source()
    configs: dict[str, Path] = {}
    for h in HOSTS:
        hdir = root / h
        (hdir / "bin").mkdir(parents=True)
        (hdir / "policies").mkdir()
        (hdir / "policies" / "host.toml").write_text(f'# host policy of {h}\nallow = ["acme"]\n')
        binary = hdir / "bin" / "qemu-system-x86_64"
        binary.write_bytes(qemu)
        binary.chmod(0o755)
        cfg = hdir / "host.toml"
        cfg.write_text(
            f'name = "{h}"\nstate_dir = "."\n\n[qemu]\nbinary = "{binary}"\n\n'
            + cluster_attestation_toml(root)
        )
        configs[h] = cfg
    lab = Lab(root, ca, configs)
    try:
        yield lab
    finally:
        for att in list(lab.opened):
            att.close()


def _pem_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cli() -> Typer:
    app, host_app = Typer(), Typer()
    app.add_typer(host_app, name="host")
    register(app, host_app)
    return app


def _run(*args: str) -> tuple[int, dict[str, object]]:
    res = CliRunner().invoke(_cli(), [*args, "--json"])
    return res.exit_code, json.loads(res.stdout)


# ---------------------------------------------------------------------------------- evidence
@pytest.mark.tpm
def test_hosts_attest_each_other_bound_to_the_transcript_hash(lab: Lab) -> None:
    lab.provision()
    a, b = lab.start("host-a"), lab.start("host-b")
    registry = AkRegistry.load(cluster_attestation_paths(lab.root)[0])
    assert registry.hosts() == ["host-a", "host-b"]  # both self-enrolled into the shared file

    th = os.urandom(32)
    summary = b.verify_evidence("host-a", a.make_evidence(th), th)
    assert summary.startswith("verified pcr_digest=")
    ok = b.last_results["host-a"]
    assert ok.ok and ok.pcr_digest is not None
    assert summary.split()[:1] == ["verified"] and f"pcr_digest={ok.pcr_digest[:16]}" in summary
    assert "capacity={" in summary  # the attested host capacity travels with the verdict
    assert {m["name"] for m in ok.measurements} == {
        "qemu-binary", "trustmig-package", "agent-config", "policy-bundle",
    }  # fmt: skip

    status = a.status()
    assert set(status["pcrs"]) == {"11", "12", "13"}
    assert status["pcrs"] == ok.pcrs  # what b verified is what a's TPM holds
    assert status["tpm"]["kind"] == "swtpm" and status["ak"]["enrolled"]
    assert [e["name"] for e in status["event_log"]] == [
        "qemu-binary", "trustmig-package", "agent-config", "policy-bundle", "host-capacity",
    ]  # fmt: skip
    assert b.status()["last_results"]["host-a"]["ok"] is True

    with pytest.raises(AttestationFailed, match="another nonce"):
        b.verify_evidence("host-a", a.make_evidence(th), os.urandom(32))
    failed = b.status()["last_results"]["host-a"]
    assert failed["ok"] is False and "another nonce" in failed["summary"]

    with pytest.raises(AttestationFailed, match="names host 'host-b'"):
        a.verify_evidence("host-a", b.make_evidence(th), th)

    # The offline view (what `trustmig host status` prints) agrees with the live one.
    off = offline_status(lab.cfg("host-b"))
    assert off["running"] is True
    assert off["ak"]["enrolled"] and off["ak"]["name"] == b.status()["ak"]["name"]
    assert off["pcrs"] == b.status()["pcrs"]
    assert off["last_results"]["host-a"]["ok"] is False


@pytest.mark.tpm
def test_unexpected_hypervisor_is_refused_naming_qemu_binary(lab: Lab) -> None:
    lab.provision()
    binary = Path(lab.cfg("host-b").qemu.binary)
    with binary.open("ab") as f:  # host-b now runs a QEMU nobody approved
        f.write(b"\x00")
    a, b = lab.start("host-a"), lab.start("host-b")
    th = os.urandom(32)
    with pytest.raises(AttestationFailed, match="qemu-binary") as ei:
        a.verify_evidence("host-b", b.make_evidence(th), th)
    assert ei.value.measurement == "qemu-binary"
    assert str(binary) in str(ei.value)
    assert a.last_results["host-b"].measurement == "qemu-binary"
    # host-b itself still accepts host-a: the refusal is about b's software only.
    assert b.verify_evidence("host-a", a.make_evidence(th), th).startswith("verified")

    # The admin approves the new binary; running agents re-read the signed file.
    code, out = _run(
        "refvalues", "add", "qemu-binary", measure_host_software(lab.cfg("host-b"),
        lab.configs["host-b"])[0][1], "--comment", "qemu rebuild", "--file",
        str(cluster_attestation_paths(lab.root)[1]), "--ca-dir", str(lab.ca.ca_dir),
    )  # fmt: skip
    assert code == 0, out
    assert a.verify_evidence("host-b", b.make_evidence(th), th).startswith("verified")


@pytest.mark.tpm
def test_unenrolled_host_is_refused_without_auto_enroll(lab: Lab) -> None:
    cfg_path = lab.configs["host-b"]
    cfg_path.write_text(cfg_path.read_text().replace("auto_enroll = true", "auto_enroll = false"))
    lab.provision()
    a, b = lab.start("host-a"), lab.start("host-b")
    assert AkRegistry.load(cluster_attestation_paths(lab.root)[0]).hosts() == ["host-a"]
    th = os.urandom(32)
    with pytest.raises(AttestationFailed, match="'host-b' is not enrolled"):
        a.verify_evidence("host-b", b.make_evidence(th), th)
    assert b.status()["ak"]["enrolled"] is False


# ---------------------------------------------------------------------------------- sealed keys
@pytest.mark.tpm
def test_sealed_key_survives_restarts_and_needs_an_authorized_reseal(lab: Lab) -> None:
    lab.provision()
    created: list[bytes] = []

    def create() -> bytes:
        created.append(_pem_key())
        return created[-1]

    a = lab.start("host-a")
    secret = a.unseal_or_create("audit-signing", create)
    assert secret.startswith(b"-----BEGIN PRIVATE KEY-----") and created == [secret]
    pcrs_first = a.status()["pcrs"]
    with pytest.raises(AgentAttestationError, match="in use by a running agent"):
        lab.start("host-a")
    lab.stop(a)

    # Restarting swtpm clears the PCRs; the measured launch rebuilds the same values.
    a = lab.start("host-a")
    assert a.status()["pcrs"] == pcrs_first
    assert a.unseal_or_create("audit-signing", create) == secret
    assert len(created) == 1
    lab.stop(a)

    # Unapproved change of the agent config: the key stays locked.
    cfg_path = lab.configs["host-a"]
    cfg_path.write_text(cfg_path.read_text() + '\n[labels]\nzone = "b"\n')
    a = lab.start("host-a")
    assert a.status()["pcrs"]["12"] != pcrs_first["12"]
    with pytest.raises(AttestError) as ei:
        a.unseal_or_create("audit-signing", create)
    assert str(ei.value) == UNSEAL_MSG
    assert len(created) == 1

    # Reseal refuses while the agent runs, and refuses software that is not approved.
    ca_dir = str(lab.ca.ca_dir)
    code, out = _run("host", "reseal", "--config", str(cfg_path), "--ca-dir", ca_dir)
    assert code == 1 and "in use by a running agent" in str(out["error"])
    lab.stop(a)
    code, out = _run("host", "reseal", "--config", str(cfg_path), "--ca-dir", ca_dir)
    assert code == 1
    assert str(out["error"]).startswith("reseal refused: agent-config sha256:")

    # The admin approves the new config, then reseals with the CA's recovery key.
    code, out = _run("refvalues", "add", "--from-host-config", str(cfg_path), "--ca-dir", ca_dir)
    assert code == 0 and len(out["added"]) == 4  # type: ignore[arg-type]
    code, out = _run("host", "reseal", "--config", str(cfg_path), "--ca-dir", ca_dir)
    assert code == 0 and out["resealed"] == ["audit-signing"], out

    a = lab.start("host-a")
    assert a.unseal_or_create("audit-signing", create) == secret
    assert out["pcrs"] == {p: v for p, v in a.status()["pcrs"].items() if p in ("11", "12")}
    assert len(created) == 1

    code, st = _run("host", "status", "--config", str(cfg_path))
    assert code == 0 and st["running"] is True
    assert st["sealed_keys"] == [
        {"name": "audit-signing", "sealed": True, "recovery": True, "pcrs": [11, 12]}
    ]


# ---------------------------------------------------------------------------------- no TPM needed
def test_missing_refvalues_name_the_command_to_create_them(lab: Lab) -> None:
    with pytest.raises(ProvisioningError, match="trustmig refvalues add"):
        lab.start("host-a")
    # Nothing is left holding the host's state: a second attempt fails the same way.
    with pytest.raises(ProvisioningError, match="trustmig refvalues add"):
        lab.start("host-a")


def test_refvalues_cli_add_list_remove(lab: Lab) -> None:
    path = str(lab.root / "rv.json")
    ca_dir = str(lab.ca.ca_dir)
    digest = "ab" * 32
    code, out = _run("refvalues", "add", "qemu-binary", digest, "--comment", "7.2", "--file", path,
                     "--ca-dir", ca_dir)  # fmt: skip
    assert code == 0 and out["added"] == [{"name": "qemu-binary", "digest": digest,
                                           "comment": "7.2"}]  # fmt: skip
    code, out = _run("refvalues", "add", "--from-host-config", str(lab.configs["host-b"]),
                     "--file", path, "--ca-dir", ca_dir)  # fmt: skip
    assert code == 0
    code, out = _run("refvalues", "list", "--file", path, "--ca-dir", ca_dir)
    names = sorted(e["name"] for e in out["entries"])  # type: ignore[attr-defined]
    assert names == ["agent-config", "policy-bundle", "qemu-binary", "qemu-binary",
                     "trustmig-package"]  # fmt: skip
    rv = RefValues.load(Path(path), lab.ca.ca_key.public_key())
    assert rv.lookup("qemu-binary", bytes.fromhex(digest)) is not None

    code, out = _run("refvalues", "remove", "qemu-binary", digest, "--file", path,
                     "--ca-dir", ca_dir)  # fmt: skip
    assert code == 0
    rv = RefValues.load(Path(path), lab.ca.ca_key.public_key())
    assert rv.lookup("qemu-binary", bytes.fromhex(digest)) is None
    code, out = _run("refvalues", "remove", "qemu-binary", digest, "--file", path,
                     "--ca-dir", ca_dir)  # fmt: skip
    assert code == 1 and "nothing removed" in str(out["error"])
    code, out = _run("refvalues", "add", "qemu-binary", "xyz", "--file", path, "--ca-dir", ca_dir)
    assert code == 1 and "not a sha256 hex" in str(out["error"])

    other = ClusterCA.init(lab.root / "other-ca")
    code, out = _run("refvalues", "list", "--file", path, "--ca-dir", str(other.ca_dir))
    assert code == 1 and "bad signature" in str(out["error"])


def test_recovery_copy_opens_only_with_the_ca_key_for_that_host_and_name(tmp_path: Path) -> None:
    ca = ec.generate_private_key(ec.SECP256R1())
    secret = _pem_key()
    blob = encrypt_recovery(secret, ca.public_key(), host="host-a", name="audit-signing")
    assert secret not in blob
    p = tmp_path / "audit-signing.recovery"
    assert decrypt_recovery(blob, ca, host="host-a", name="audit-signing", path=p) == secret
    with pytest.raises(AgentAttestationError, match="does not decrypt with CA key"):
        decrypt_recovery(blob, ec.generate_private_key(ec.SECP256R1()), host="host-a",
                         name="audit-signing", path=p)  # fmt: skip
    with pytest.raises(AgentAttestationError, match="does not decrypt"):
        decrypt_recovery(blob, ca, host="host-b", name="audit-signing", path=p)
    with pytest.raises(AgentAttestationError, match="is not a trustmig-key-recovery/1 file"):
        decrypt_recovery(b"{}", ca, host="host-a", name="audit-signing", path=p)


def test_measurements_are_deterministic_and_track_each_input(lab: Lab) -> None:
    cfg, path = lab.cfg("host-a"), lab.configs["host-a"]
    first = {n: d for n, d, _ in measure_host_software(cfg, path)}
    assert first == {n: d for n, d, _ in measure_host_software(cfg, path)}
    (cfg.policy_dir / "extra.toml").write_text("deny = []\n")
    second = {n: d for n, d, _ in measure_host_software(cfg, path)}
    changed = {n for n in first if first[n] != second[n]}
    assert changed == {"policy-bundle"}
    shutil.rmtree(cfg.policy_dir)
    empty = {n: d for n, d, _ in measure_host_software(cfg, path)}
    assert empty["policy-bundle"] == hashlib.sha256(b"").hexdigest()  # empty bundle

    bad = cfg.model_copy(update={"qemu": cfg.qemu.model_copy(update={"binary": "no-such-qemu"})})
    with pytest.raises(ProvisioningError, match=r"qemu binary 'no-such-qemu'.*not found"):
        measure_host_software(bad, path)
