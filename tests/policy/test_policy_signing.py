"""Signed VM policies with real ECDSA P-256 keys and certificates from a real test CA."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from policy_helpers import VM_TOML, VM_YAML, MiniPki

from trustmig.policy import (
    PolicyError,
    PolicySignatureError,
    SignedPolicy,
    VmOwnership,
    sign_policy,
    verify_signed_policy,
)


def test_round_trip_through_json(pki: MiniPki) -> None:
    alice = pki.issue("alice", ("owner",))
    sp = sign_policy(VM_TOML, "toml", "alice", alice.cert_der, alice.key)
    wire = SignedPolicy.from_json(sp.to_json())
    assert wire == sp
    policy = verify_signed_policy(wire, pki.verifier())
    assert policy.vm == "web-1" and policy.signed_by == "alice"
    assert policy.destinations.countries == ["DE", "FR"]


def test_yaml_policy_signed_by_security_admin(pki: MiniPki) -> None:
    sam = pki.issue("sam", ("security-admin",), tenant=None)
    sp = sign_policy(VM_YAML, "yaml", "sam", sam.cert_der, sam.key)
    assert verify_signed_policy(sp, pki.verifier()).signed_by == "sam"


def test_tampered_text_rejected(pki: MiniPki) -> None:
    alice = pki.issue("alice", ("owner",))
    sp = sign_policy(VM_TOML, "toml", "alice", alice.cert_der, alice.key)
    tampered = SignedPolicy(
        sp.policy_text.replace('["DE", "FR"]', '["DE", "FR", "US"]'),
        sp.fmt,
        sp.signer,
        sp.signer_cert_der,
        sp.signature,
    )
    with pytest.raises(PolicySignatureError) as err:
        verify_signed_policy(tampered, pki.verifier())
    assert str(err.value) == "policy for web-1: signature does not verify (forged or modified)"


def test_forged_signature_rejected(pki: MiniPki) -> None:
    alice = pki.issue("alice", ("owner",))
    mallory_key = ec.generate_private_key(ec.SECP256R1())
    sp = sign_policy(VM_TOML, "toml", "alice", alice.cert_der, alice.key)
    from cryptography.hazmat.primitives import hashes

    from trustmig.policy.signing import signing_payload

    forged_sig = mallory_key.sign(
        signing_payload(sp.policy_text, sp.fmt, sp.signer, sp.signer_cert_der),
        ec.ECDSA(hashes.SHA256()),
    )
    forged = SignedPolicy(sp.policy_text, sp.fmt, sp.signer, sp.signer_cert_der, forged_sig)
    with pytest.raises(PolicySignatureError, match="signature does not verify"):
        verify_signed_policy(forged, pki.verifier())


def test_signature_not_reusable_with_other_format_or_signer_field(pki: MiniPki) -> None:
    alice = pki.issue("alice", ("owner",))
    sp = sign_policy(VM_TOML, "toml", "alice", alice.cert_der, alice.key)
    yaml_claim = SignedPolicy(VM_TOML, "yaml", sp.signer, sp.signer_cert_der, sp.signature)
    with pytest.raises(PolicyError):
        verify_signed_policy(yaml_claim, pki.verifier())


def test_signer_neither_owner_nor_security_admin_refused(pki: MiniPki) -> None:
    olga = pki.issue("olga", ("operator",), tenant=None)
    sp = sign_policy(VM_TOML, "toml", "olga", olga.cert_der, olga.key)
    with pytest.raises(PolicySignatureError, match="olga is neither the VM's owner"):
        verify_signed_policy(sp, pki.verifier())


def test_owner_of_another_vm_may_not_sign(pki: MiniPki) -> None:
    carol = pki.issue("carol", ("owner",))
    sp = sign_policy(VM_TOML, "toml", "carol", carol.cert_der, carol.key)
    with pytest.raises(PolicySignatureError, match="neither the VM's owner"):
        verify_signed_policy(sp, pki.verifier())


def test_certificate_from_another_ca_rejected(pki: MiniPki) -> None:
    rogue = MiniPki().issue("alice", ("owner",))
    sp = sign_policy(VM_TOML, "toml", "alice", rogue.cert_der, rogue.key)
    with pytest.raises(PolicySignatureError, match="signer certificate rejected"):
        verify_signed_policy(sp, pki.verifier())


def test_revoked_signer_rejected() -> None:
    local = MiniPki()
    alice = local.issue("alice", ("owner",))
    sp = sign_policy(VM_TOML, "toml", "alice", alice.cert_der, alice.key)
    verify_signed_policy(sp, local.verifier())
    local.revoked.add(local.verifier()(alice.cert_der).serial)
    with pytest.raises(PolicySignatureError, match="revoked"):
        verify_signed_policy(sp, local.verifier())


def test_signer_name_must_match_certificate(pki: MiniPki) -> None:
    olga = pki.issue("olga", ("operator",), tenant=None)
    sp = sign_policy(VM_TOML, "toml", "alice", olga.cert_der, olga.key)
    with pytest.raises(PolicySignatureError, match="belongs to 'olga'"):
        verify_signed_policy(sp, pki.verifier())


def test_refuses_to_sign_malformed_policy_or_with_wrong_key(pki: MiniPki) -> None:
    alice = pki.issue("alice", ("owner",))
    with pytest.raises(PolicyError, match="unknown key"):
        sign_policy(VM_TOML + "color = 1\n", "toml", "alice", alice.cert_der, alice.key)
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(PolicyError, match="does not match the signing key"):
        sign_policy(VM_TOML, "toml", "alice", alice.cert_der, other)
    with pytest.raises(PolicyError, match="P-256"):
        sign_policy(
            VM_TOML, "toml", "alice", alice.cert_der, ec.generate_private_key(ec.SECP384R1())
        )


@pytest.mark.parametrize(
    "text",
    ["not json", "[]", '{"version": 2}', '{"version": 1, "fmt": "toml"}'],
)
def test_from_json_rejects_garbage(text: str) -> None:
    with pytest.raises(PolicyError, match="signed policy"):
        SignedPolicy.from_json(text)


# ------------------------------------------------------------------ recorded ownership
RECORDED = VmOwnership("web-1", "acme", "alice")


def test_a_policy_naming_a_new_owner_changes_nothing(pki: MiniPki) -> None:
    """Mallory signs a policy that names herself owner: the host's record says alice."""
    mallory = pki.issue("mallory", ("owner",))
    text = VM_TOML.replace('owner = "alice"', 'owner = "mallory"')
    sp = sign_policy(text, "toml", "mallory", mallory.cert_der, mallory.key)
    verify_signed_policy(sp, pki.verifier())  # self-consistent, so only the record can tell
    with pytest.raises(PolicySignatureError) as err:
        verify_signed_policy(sp, pki.verifier(), RECORDED)
    assert str(err.value) == (
        "policy for web-1: names owner 'mallory' but the VM's owner here is 'alice'; "
        "ownership moves only by 'trustmig vm transfer'"
    )


def test_the_recorded_owner_and_a_tenant_admin_may_sign(pki: MiniPki) -> None:
    alice = pki.issue("alice", ("owner",))
    tia = pki.issue("tia", ("tenant-admin",))
    for who, cred in (("alice", alice), ("tia", tia)):
        sp = sign_policy(VM_TOML, "toml", who, cred.cert_der, cred.key)
        assert verify_signed_policy(sp, pki.verifier(), RECORDED).signed_by == who


def test_a_tenant_admin_of_another_tenant_may_not_sign(pki: MiniPki) -> None:
    tia = pki.issue("tia", ("tenant-admin",), tenant="evil")
    sp = sign_policy(VM_TOML, "toml", "tia", tia.cert_der, tia.key)
    with pytest.raises(PolicySignatureError, match="neither the VM's owner"):
        verify_signed_policy(sp, pki.verifier(), RECORDED)


def test_a_policy_for_another_tenant_is_refused(pki: MiniPki) -> None:
    sam = pki.issue("sam", ("security-admin",), tenant=None)
    sp = sign_policy(VM_TOML, "toml", "sam", sam.cert_der, sam.key)
    with pytest.raises(PolicySignatureError, match="names tenant 'acme' but the VM's tenant"):
        verify_signed_policy(sp, pki.verifier(), VmOwnership("web-1", "evil", "alice"))
