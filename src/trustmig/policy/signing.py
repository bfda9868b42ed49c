"""Signed VM policies: the policy travels with the VM and the destination checks who wrote it.

The signature (ECDSA P-256, SHA-256) covers a domain-separated canonical encoding of the exact
policy text, its format, the signer's name and the signer's certificate. Signing the text rather
than a re-serialised model means the bytes the owner reviewed are the bytes that are verified;
the domain tag keeps a policy signature from ever being mistaken for any other signature made
with the same key (audit records, handshakes).

Only the VM's recorded owner (holding the ``owner`` role), a tenant-admin of its tenant or a
security-admin may sign a VM policy: an operator who could rewrite the policy of the VMs they
migrate would make the policy pointless, and a policy naming a new owner changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.policy.access import VmAction, VmOwnership, decide_vm_access
from trustmig.policy.errors import PolicyError, PolicySignatureError
from trustmig.policy.loading import as_format, parse_vm_policy
from trustmig.policy.models import VmPolicy

SIGNATURE_DOMAIN = b"trustmig/vm-policy/v1\x00"


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def signing_payload(policy_text: str, fmt: str, signer: str, signer_cert_der: bytes) -> bytes:
    """The exact bytes that are signed: domain tag, then length-prefixed fields."""
    return (
        SIGNATURE_DOMAIN
        + _field(fmt.encode("utf-8"))
        + _field(signer.encode("utf-8"))
        + _field(signer_cert_der)
        + _field(policy_text.encode("utf-8"))
    )


@dataclass(frozen=True)
class SignedPolicy:
    """A VM policy as provisioned and shipped to destinations."""

    policy_text: str
    fmt: str
    signer: str
    signer_cert_der: bytes
    signature: bytes

    def to_json(self) -> str:
        """Stable JSON (binary fields in base64) for storage next to the VM and for the wire."""
        return json.dumps(
            {
                "version": 1,
                "policy_text": self.policy_text,
                "fmt": self.fmt,
                "signer": self.signer,
                "signer_cert_der": base64.b64encode(self.signer_cert_der).decode("ascii"),
                "signature": base64.b64encode(self.signature).decode("ascii"),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedPolicy:
        """Parse :meth:`to_json` output; any structural problem is a ``PolicyError``."""
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PolicyError(f"signed policy: not valid JSON ({exc}); re-export it") from None
        if not isinstance(obj, dict) or obj.get("version") != 1:
            raise PolicyError("signed policy: expected a JSON object with version 1; re-export it")
        expected = {"version", "policy_text", "fmt", "signer", "signer_cert_der", "signature"}
        if set(obj) != expected:
            raise PolicyError(
                f"signed policy: expected keys {', '.join(sorted(expected))}, "
                f"got {', '.join(sorted(obj))}"
            )
        for key in ("policy_text", "fmt", "signer", "signer_cert_der", "signature"):
            if not isinstance(obj[key], str):
                raise PolicyError(f"signed policy: {key} must be a string; re-export it")
        try:
            cert = base64.b64decode(obj["signer_cert_der"], validate=True)
            sig = base64.b64decode(obj["signature"], validate=True)
        except (binascii.Error, ValueError):
            raise PolicyError("signed policy: certificate or signature is not base64") from None
        return cls(obj["policy_text"], obj["fmt"], obj["signer"], cert, sig)


def sign_policy(
    policy_text: str,
    fmt: str,
    signer_name: str,
    signer_cert_der: bytes,
    key: ec.EllipticCurvePrivateKey,
) -> SignedPolicy:
    """Sign a VM policy text. The text is validated first: nobody signs a malformed policy."""
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PolicyError("policy signing key must be an ECDSA P-256 private key")
    parse_vm_policy(policy_text, source="policy to sign", fmt=as_format(fmt, "policy to sign"))
    try:
        cert = x509.load_der_x509_certificate(signer_cert_der)
    except ValueError:
        raise PolicyError(
            "signer certificate is not DER X.509; pass the certificate's DER bytes"
        ) from None
    if cert.public_key() != key.public_key():
        raise PolicyError(
            "signer certificate does not match the signing key; use the key's own cert"
        )
    payload = signing_payload(policy_text, fmt, signer_name, signer_cert_der)
    signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    return SignedPolicy(policy_text, fmt, signer_name, signer_cert_der, signature)


def _may_sign(identity: Any, policy: VmPolicy, ownership: VmOwnership | None) -> bool:
    """The signer is the VM's recorded owner, a tenant-admin of its tenant or a security-admin.

    Without a recorded ownership (an offline check of a file) the policy's own ``owner`` and
    ``tenant`` stand in; a host never does that for a VM it holds.
    """
    tenant = ownership.tenant if ownership is not None else policy.tenant
    owner = ownership.owner if ownership is not None else policy.owner
    principal = SimpleNamespace(
        name=str(getattr(identity, "name", "")),
        roles=tuple(getattr(identity, "roles", ()) or ()),
        tenant=getattr(identity, "tenant", None),
    )
    vm = VmOwnership(policy.vm, tenant, owner)
    return decide_vm_access(principal, VmAction.POLICY_SIGN, vm).allow


def _check_ownership(label: str, policy: VmPolicy, ownership: VmOwnership | None) -> None:
    if ownership is None:
        return
    for what, held, named in (
        ("VM", ownership.vm, policy.vm),
        ("tenant", ownership.tenant, policy.tenant),
        ("owner", ownership.owner, policy.owner),
    ):
        if held != named:
            raise PolicySignatureError(
                f"{label}: names {what} {named!r} but the VM's {what} here is {held!r}; "
                "ownership moves only by 'trustmig vm transfer'"
            )


def verify_signed_policy(
    sp: SignedPolicy,
    verify_signer: Callable[[bytes], Any],
    ownership: VmOwnership | None = None,
) -> VmPolicy:
    """Check a signed VM policy and return it marked with its verified signer.

    ``verify_signer(cert_der)`` comes from the PKI trust bundle: it returns the signer's identity
    and raises if the certificate is not from the cluster CA or is revoked. ``ownership`` is the
    VM's tenant and owner as the host recorded them: the policy must name exactly those, and
    the signer must be entitled to sign for them (raises ``PolicySignatureError`` otherwise).
    """
    fmt = as_format(sp.fmt, "signed policy")
    policy = parse_vm_policy(sp.policy_text, source="signed policy", fmt=fmt)
    label = f"policy for {policy.vm}"
    try:
        identity = verify_signer(sp.signer_cert_der)
    except Exception as exc:
        raise PolicySignatureError(
            f"{label}: signer certificate rejected ({exc}); re-sign with a current cluster cert"
        ) from None
    if getattr(identity, "name", None) != sp.signer:
        raise PolicySignatureError(
            f"{label}: signature names {sp.signer!r} but the certificate belongs to "
            f"{getattr(identity, 'name', None)!r} (forged or modified)"
        )
    try:
        public_key = x509.load_der_x509_certificate(sp.signer_cert_der).public_key()
    except ValueError:
        raise PolicySignatureError(f"{label}: signer certificate is not DER X.509") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise PolicySignatureError(f"{label}: signer key is not ECDSA P-256; re-sign with one")
    payload = signing_payload(sp.policy_text, sp.fmt, sp.signer, sp.signer_cert_der)
    try:
        public_key.verify(sp.signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PolicySignatureError(
            f"{label}: signature does not verify (forged or modified)"
        ) from None
    _check_ownership(label, policy, ownership)
    if not _may_sign(identity, policy, ownership):
        owner = ownership.owner if ownership is not None else policy.owner
        raise PolicySignatureError(
            f"{label}: signer {sp.signer} is neither the VM's owner ({owner}), a tenant-admin "
            "of its tenant nor a security-admin; have one of them sign it"
        )
    return policy.with_signer(sp.signer)
