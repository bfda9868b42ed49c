"""Signed reference values: the cluster's list of known-good measurements.

A security administrator (or the cluster CA) signs the list with an ECDSA P-256 key; verifiers
load it only if the signature verifies with the key they trust, so a host that can write the file
still cannot whitelist its own software.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.attest.errors import RefValuesError

REFVALUES_FORMAT = "trustmig-refvalues/1"


@dataclass(frozen=True)
class RefValue:
    name: str
    digest_hex: str
    comment: str = ""


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """Short identifier of a signing key (sha256 of its DER SubjectPublicKeyInfo, 16 hex)."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    h = hashes.Hash(hashes.SHA256())
    h.update(der)
    return h.finalize().hex()[:16]


class RefValues:
    """Known-good (name, sha256) pairs; several digests per name are allowed (rolling upgrades)."""

    def __init__(self, entries: list[RefValue] | None = None) -> None:
        self.entries: list[RefValue] = list(entries or [])

    def add(self, name: str, digest: bytes | str, comment: str = "") -> RefValue:
        digest_hex = digest.hex() if isinstance(digest, bytes) else digest.lower()
        try:
            ok = len(bytes.fromhex(digest_hex)) == 32
        except ValueError:
            ok = False
        if not ok:
            raise RefValuesError(f"reference digest for {name!r} is not a sha256 hex; pass 64 hex")
        if not name:
            raise RefValuesError("reference value needs a measurement name (e.g. 'qemu-binary')")
        entry = RefValue(name=name, digest_hex=digest_hex, comment=comment)
        if not self.lookup(name, bytes.fromhex(digest_hex)):
            self.entries.append(entry)
        return entry

    def remove(self, name: str, digest_hex: str) -> None:
        before = len(self.entries)
        self.entries = [
            e for e in self.entries if not (e.name == name and e.digest_hex == digest_hex.lower())
        ]
        if len(self.entries) == before:
            raise RefValuesError(
                f"no reference value {name} sha256:{digest_hex[:12]}; nothing removed"
            )

    def list(self) -> list[RefValue]:
        return sorted(self.entries, key=lambda e: (e.name, e.digest_hex))

    def lookup(self, name: str, digest: bytes) -> RefValue | None:
        """The entry accepting `digest` for measurement `name`, or None."""
        h = digest.hex()
        for e in self.entries:
            if e.name == name and e.digest_hex == h:
                return e
        return None

    def save(self, path: Path, signing_key: ec.EllipticCurvePrivateKey) -> None:
        """Write the list with an ECDSA P-256/SHA-256 signature over its canonical JSON body."""
        if not isinstance(signing_key, ec.EllipticCurvePrivateKey) or not isinstance(
            signing_key.curve, ec.SECP256R1
        ):
            raise RefValuesError("reference values must be signed with an ECDSA P-256 private key")
        body = {
            "format": REFVALUES_FORMAT,
            "signed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "key_id": key_id(signing_key.public_key()),
            "entries": [asdict(e) for e in self.list()],
        }
        sig = signing_key.sign(_canonical(body), ec.ECDSA(hashes.SHA256()))
        doc = {"body": body, "signature": base64.b64encode(sig).decode()}
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True, indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, verify_key: ec.EllipticCurvePublicKey) -> RefValues:
        """Read and verify a signed list; any doubt (bad JSON, wrong key, bad signature) refuses."""
        try:
            doc = json.loads(Path(path).read_bytes())
            body, sig = doc["body"], base64.b64decode(doc["signature"], validate=True)
            if body.get("format") != REFVALUES_FORMAT:
                raise ValueError("format")
        except OSError as exc:
            raise RefValuesError(f"cannot read reference values {path} ({exc.strerror})") from None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RefValuesError(
                f"reference values {path} are not a signed {REFVALUES_FORMAT} file; "
                "re-export them with RefValues.save"
            ) from None
        try:
            verify_key.verify(sig, _canonical(body), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise RefValuesError(
                f"reference values {path} have a bad signature (key {body.get('key_id')!s}, "
                f"expected {key_id(verify_key)}); re-sign them with the security-admin key"
            ) from None
        rv = cls()
        try:
            for e in body["entries"]:
                rv.add(e["name"], e["digest_hex"], e.get("comment", ""))
        except (KeyError, TypeError, AttributeError):
            raise RefValuesError(
                f"reference values {path} have a malformed entry; re-export"
            ) from None
        return rv
