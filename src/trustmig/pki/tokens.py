"""Short-lived user tokens signed by the cluster CA.

A token is ``base64url(header).base64url(claims).base64url(signature)`` with an ES256 signature
(raw ``r || s``, as in JWS) made with the CA key over the first two parts. Tokens suit scripts and
one-off delegations where handing out a key file is awkward; like certificates they carry a
serial that ends up in ``crl.pem`` when the user is revoked, so one revocation covers both.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from trustmig.pki.errors import PeerRejected
from trustmig.pki.identity import canonical_json

TOKEN_TYPE = "trustmig-user"
HEADER: dict[str, str] = {"alg": "ES256", "typ": TOKEN_TYPE}
_COORD = 32  # bytes per P-256 coordinate


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    pad = "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(text + pad)


def sign_token(key: ec.EllipticCurvePrivateKey, claims: dict[str, Any]) -> str:
    """Serialise ``claims`` canonically and sign header+claims with ``key``."""
    signing_input = f"{b64url(canonical_json(HEADER))}.{b64url(canonical_json(claims))}"
    der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(_COORD, "big") + s.to_bytes(_COORD, "big")
    return f"{signing_input}.{b64url(raw)}"


def open_token(token: str, public_key: ec.EllipticCurvePublicKey) -> tuple[dict[str, Any], bytes]:
    """Check structure and signature; return the claims and the signed bytes.

    Expiry, revocation and claim contents are checked by the caller, which knows the clock and
    the revocation list.
    """
    if not isinstance(token, str):
        raise PeerRejected("user token must be a string of three base64url parts")
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise PeerRejected(
            "user token is malformed: expected three base64url parts separated by '.'"
        )
    try:
        header = json.loads(unb64url(parts[0]))
        raw_sig = unb64url(parts[2])
    except (ValueError, binascii.Error):
        raise PeerRejected("user token is malformed: a part is not valid base64url JSON") from None
    if header != HEADER:
        raise PeerRejected(f"user token header {header!r} is not supported: expected {HEADER!r}")
    if len(raw_sig) != 2 * _COORD:
        raise PeerRejected("user token signature has the wrong length: the token was altered")
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    der = encode_dss_signature(
        int.from_bytes(raw_sig[:_COORD], "big"), int.from_bytes(raw_sig[_COORD:], "big")
    )
    try:
        public_key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PeerRejected(
            "user token signature does not verify: it was altered or not issued by this "
            "cluster's CA"
        ) from None
    try:
        claims = json.loads(unb64url(parts[1]))
    except (ValueError, binascii.Error):
        raise PeerRejected("user token claims are not valid JSON") from None
    if not isinstance(claims, dict):
        raise PeerRejected("user token claims must be a JSON object")
    return claims, signing_input
