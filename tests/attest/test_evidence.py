from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.attest.errors import AttestationFailed
from trustmig.attest.evidence import make_evidence, verify_evidence
from trustmig.attest.measure import EventLog, MeasurementEvent

from .conftest import TpmFactory
from .helpers import launch_host, registry, sign_refvalues

pytestmark = pytest.mark.tpm


def test_measured_launch_quote_verify_ok(
    tpm_factory: TpmFactory, tmp_path: Path, admin_key: ec.EllipticCurvePrivateKey
) -> None:
    reg = tmp_path / "registry.json"
    a = launch_host("host-a", tpm_factory("host-a"), tmp_path, reg)
    refs = sign_refvalues(tmp_path / "ref.json", admin_key, a)
    th = hashlib.sha256(b"handshake transcript").digest()
    ev = make_evidence(a.tpm, th, a.log, host="host-a")
    res = verify_evidence(
        ev, peer_name="host-a", transcript_hash=th, registry=registry(reg), refvalues=refs
    )
    assert res.ok and res.host == "host-a"
    assert sorted(m["name"] for m in res.measurements) == [
        "agent-config",
        "policy-bundle",
        "qemu-binary",
        "trustmig-package",
    ]
    assert res.pcrs[11] == a.tpm.pcr_read([11])[11].hex()
    assert res.pcrs[11] != bytes(32).hex()


def test_unknown_qemu_binary_is_named(
    tpm_factory: TpmFactory, tmp_path: Path, admin_key: ec.EllipticCurvePrivateKey
) -> None:
    reg = tmp_path / "registry.json"
    a = launch_host("host-a", tpm_factory("host-a"), tmp_path, reg, qemu_content=b"patched qemu")
    refs = sign_refvalues(tmp_path / "ref.json", admin_key, a, skip="qemu-binary")
    refs.add("qemu-binary", hashlib.sha256(b"qemu 7.2").digest(), "approved build")
    th = os.urandom(32)
    ev = make_evidence(a.tpm, th, a.log, host="host-a")
    with pytest.raises(
        AttestationFailed, match=r"qemu-binary sha256:[0-9a-f]{12} .*not in reference values"
    ) as ei:
        verify_evidence(
            ev, peer_name="host-a", transcript_hash=th, registry=registry(reg), refvalues=refs
        )
    assert ei.value.measurement == "qemu-binary"


def test_quote_over_other_nonce_refused(
    tpm_factory: TpmFactory, tmp_path: Path, admin_key: ec.EllipticCurvePrivateKey
) -> None:
    reg = tmp_path / "registry.json"
    a = launch_host("host-a", tpm_factory("host-a"), tmp_path, reg)
    refs = sign_refvalues(tmp_path / "ref.json", admin_key, a)
    old = make_evidence(a.tpm, os.urandom(32), a.log, host="host-a")  # earlier connection
    with pytest.raises(AttestationFailed, match="another nonce") as ei:
        verify_evidence(
            old,
            peer_name="host-a",
            transcript_hash=os.urandom(32),
            registry=registry(reg),
            refvalues=refs,
        )
    assert ei.value.measurement is None


def test_quote_by_host_b_presented_as_host_a_refused(
    tpm_factory: TpmFactory, tmp_path: Path, admin_key: ec.EllipticCurvePrivateKey
) -> None:
    reg = tmp_path / "registry.json"
    a = launch_host("host-a", tpm_factory("host-a"), tmp_path, reg)
    b = launch_host("host-b", tpm_factory("host-b"), tmp_path, reg)
    refs = sign_refvalues(tmp_path / "ref.json", admin_key, a, b)
    th = os.urandom(32)
    forged = make_evidence(b.tpm, th, b.log, host="host-a")  # B claims to be A
    with pytest.raises(AttestationFailed, match="does not verify with the enrolled AK of 'host-a'"):
        verify_evidence(
            forged, peer_name="host-a", transcript_hash=th, registry=registry(reg), refvalues=refs
        )
    relayed = make_evidence(b.tpm, th, b.log, host="host-b")  # B's own evidence on A's channel
    with pytest.raises(AttestationFailed, match="channel peer is 'host-a'"):
        verify_evidence(
            relayed, peer_name="host-a", transcript_hash=th, registry=registry(reg), refvalues=refs
        )
    # Not enrolled at all.
    with pytest.raises(AttestationFailed, match="not enrolled"):
        verify_evidence(
            relayed, peer_name="host-c", transcript_hash=th, registry=registry(reg), refvalues=refs
        )


def test_tampered_event_log_refused(
    tpm_factory: TpmFactory, tmp_path: Path, admin_key: ec.EllipticCurvePrivateKey
) -> None:
    reg = tmp_path / "registry.json"
    a = launch_host("host-a", tpm_factory("host-a"), tmp_path, reg, qemu_content=b"patched qemu")
    refs = sign_refvalues(tmp_path / "ref.json", admin_key, a, skip="qemu-binary")
    good_qemu = hashlib.sha256(b"qemu 7.2").digest()
    refs.add("qemu-binary", good_qemu)
    # The host hides its patched QEMU by reporting the approved digest in its log.
    lie = EventLog(
        [
            MeasurementEvent(
                e.pcr, e.name, good_qemu if e.name == "qemu-binary" else e.digest, e.detail
            )
            for e in a.log.events
        ]
    )
    th = os.urandom(32)
    ev = make_evidence(a.tpm, th, lie, host="host-a")
    with pytest.raises(AttestationFailed, match="does not replay to quoted PCR 11"):
        verify_evidence(
            ev, peer_name="host-a", transcript_hash=th, registry=registry(reg), refvalues=refs
        )
    # Altering the reported PCR values to match the lie breaks the signed digest instead.
    doc = json.loads(ev)
    doc["quote"]["pcrs"]["11"] = lie.replay()[11].hex()
    with pytest.raises(AttestationFailed, match="do not match the signed PCR digest"):
        verify_evidence(
            json.dumps(doc).encode(),
            peer_name="host-a",
            transcript_hash=th,
            registry=registry(reg),
            refvalues=refs,
        )
    # Dropping an event: the log no longer replays either.
    short = EventLog(a.log.events[1:])
    ev = make_evidence(a.tpm, th, short, host="host-a")
    with pytest.raises(AttestationFailed, match="does not replay"):
        verify_evidence(
            ev, peer_name="host-a", transcript_hash=th, registry=registry(reg), refvalues=refs
        )
    with pytest.raises(AttestationFailed, match="not a trustmig-evidence"):
        verify_evidence(
            b"garbage",
            peer_name="host-a",
            transcript_hash=th,
            registry=registry(reg),
            refvalues=refs,
        )


def _launch_with(
    tpm_factory: TpmFactory,
    tmp_path: Path,
    extra: list[tuple[str, bytes, str]],
    drop: str | None = None,
):  # type: ignore[no-untyped-def]
    from trustmig.attest.enroll import enroll_host
    from trustmig.attest.measure import launch_items, measured_launch

    reg = tmp_path / "registry.json"
    tpm = tpm_factory("host-a")
    hdir = tmp_path / "files"
    hdir.mkdir()
    qemu, cfg, pol = hdir / "qemu", hdir / "host.toml", hdir / "policy.bundle"
    qemu.write_bytes(b"qemu 7.2")
    cfg.write_text('name = "host-a"\n')
    pol.write_text("allow: all\n")
    enroll_host("host-a", tpm, reg)
    items = [i for i in launch_items(qemu, cfg, pol) if i[0] != drop] + extra
    log = measured_launch(tpm, items, hdir / "log.json")
    return tpm, log, reg


def _verify_all_software_approved(tpm, log, reg):  # type: ignore[no-untyped-def]
    """Verify fresh evidence with every software event of ``log`` in the reference values."""
    from trustmig.attest.refvalues import RefValues

    refs = RefValues()
    for e in log.events:
        if e.name != "host-capacity":
            refs.add(e.name, e.digest)
    th = os.urandom(32)
    ev = make_evidence(tpm, th, log, host="host-a")
    return verify_evidence(ev, peer_name="host-a", transcript_hash=th, registry=registry(reg),
                           refvalues=refs)  # fmt: skip


def test_software_cannot_pass_as_a_data_event(
    tpm_factory: TpmFactory, tmp_path: Path, admin_key: ec.EllipticCurvePrivateKey
) -> None:
    from trustmig.attest.measure import data_event_digest

    # an unapproved agent config, measured under the data event's name instead of its own
    text = 'name = "host-a"\nguard = {allowed_networks = ["0.0.0.0/0"]}\n'
    relabel = [("host-capacity", data_event_digest("host-capacity", text), text)]
    tpm, log, reg = _launch_with(tpm_factory, tmp_path, relabel, drop="agent-config")
    with pytest.raises(AttestationFailed, match=r"lacks the measurements \['agent-config'\]"):
        _verify_all_software_approved(tpm, log, reg)


def test_second_capacity_event_is_refused(
    tpm_factory: TpmFactory, tmp_path: Path, admin_key: ec.EllipticCurvePrivateKey
) -> None:
    from trustmig.attest.measure import data_event_digest

    caps = ['{"mem_mib":4096,"vcpus":2}', '{"mem_mib":65536,"vcpus":64}']  # later: inflated
    extra = [("host-capacity", data_event_digest("host-capacity", c), c) for c in caps]
    tpm, log, reg = _launch_with(tpm_factory, tmp_path, extra)
    with pytest.raises(AttestationFailed, match=r"host-capacity event .* repeated"):
        _verify_all_software_approved(tpm, log, reg)
