"""Short-lived user tokens: round trip, expiry, tampering, revocation, foreign CA."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from trustmig.pki import ClusterCA, InvalidInput, PeerRejected, TrustBundle


def _bundle(ca: ClusterCA) -> TrustBundle:
    return TrustBundle.load(ca.ca_path, ca.crl_path)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, object]:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_token_round_trip(ca: ClusterCA) -> None:
    token = ca.issue_user_token("alice", ["operator", "owner"], "blue", ttl_s=600)
    who = _bundle(ca).verify_user_token(token)
    assert (who.kind, who.name, who.roles, who.tenant) == (
        "user",
        "alice",
        ("owner", "operator"),
        "blue",
    )
    record = ca.issued()[-1]
    assert (record["form"], record["name"], record["serial"]) == ("token", "alice", who.serial)


def test_token_expires(ca: ClusterCA) -> None:
    token = ca.issue_user_token("alice", ["auditor"], None, ttl_s=60)
    bundle = _bundle(ca)
    exp = datetime.fromtimestamp(int(_claims(token)["exp"]), UTC)  # type: ignore[call-overload]
    assert bundle.verify_user_token(token, now=exp - timedelta(seconds=1)).name == "alice"
    with pytest.raises(PeerRejected, match=r"user token for 'alice' expired on \d{4}-"):
        bundle.verify_user_token(token, now=exp)


def test_tampered_claims_are_detected(ca: ClusterCA) -> None:
    token = ca.issue_user_token("alice", ["auditor"], None, ttl_s=60)
    header, _, sig = token.split(".")
    claims = _claims(token)
    claims["roles"] = ["owner"]
    forged = f"{header}.{_b64(json.dumps(claims).encode())}.{sig}"
    with pytest.raises(PeerRejected, match="signature does not verify"):
        _bundle(ca).verify_user_token(forged)


def test_tampered_signature_and_garbage_are_detected(ca: ClusterCA) -> None:
    token = ca.issue_user_token("alice", ["auditor"], None, ttl_s=60)
    header, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[5] ^= 0x01
    bundle = _bundle(ca)
    with pytest.raises(PeerRejected, match="signature does not verify"):
        bundle.verify_user_token(f"{header}.{body}.{_b64(bytes(raw))}")
    with pytest.raises(PeerRejected, match="malformed"):
        bundle.verify_user_token("not-a-token")
    with pytest.raises(PeerRejected, match="wrong length"):
        bundle.verify_user_token(f"{header}.{body}.{_b64(b'short')}")


def test_token_of_revoked_user_is_refused(ca: ClusterCA, tmp_path: Path) -> None:
    ca.issue_user("alice", tmp_path / "alice", roles=["owner"])
    token = ca.issue_user_token("alice", ["owner"], None, ttl_s=300)
    bundle = _bundle(ca)
    assert bundle.verify_user_token(token).name == "alice"
    serials = ca.revoke("alice", "user")
    assert len(serials) == 2  # the certificate and the token
    with pytest.raises(PeerRejected, match=r"user token for 'alice' is revoked \(serial 0x"):
        bundle.verify_user_token(token)


def test_token_from_another_ca_is_refused(ca: ClusterCA, tmp_path: Path) -> None:
    other = ClusterCA.init(tmp_path / "other")
    token = other.issue_user_token("mallory", ["owner"], None, ttl_s=60)
    with pytest.raises(PeerRejected, match="signature does not verify"):
        _bundle(ca).verify_user_token(token)


def test_token_arguments_are_validated(ca: ClusterCA) -> None:
    with pytest.raises(InvalidInput, match="unknown role 'root'"):
        ca.issue_user_token("alice", ["root"], None, ttl_s=60)
    with pytest.raises(InvalidInput, match="ttl_s=0"):
        ca.issue_user_token("alice", ["owner"], None, ttl_s=0)
    with pytest.raises(InvalidInput, match="ttl_s=99999999"):
        ca.issue_user_token("alice", ["owner"], None, ttl_s=99_999_999)
