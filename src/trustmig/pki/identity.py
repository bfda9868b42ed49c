"""Who a peer is, and the naming rules shared by certificates and tokens.

The same rules are applied when issuing and when verifying, so a name that could not have been
issued (for instance one with a path separator or upper-case host letters) is refused on both
sides instead of being silently normalised.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509

from trustmig.pki.errors import InvalidInput

Kind = Literal["host", "user"]

ROLES: tuple[str, ...] = (
    "owner",
    "operator",
    "tenant-admin",
    "cluster-admin",
    "security-admin",
    "auditor",
)

#: Organisational unit that marks the kind of a leaf certificate.
OU_HOST = "trustmig-host"
OU_USER = "trustmig-user"
KIND_OU: dict[str, str] = {"host": OU_HOST, "user": OU_USER}

#: Non-critical extension carrying ``{"roles": [...], "tenant": ...}`` as canonical JSON.
ROLES_EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.59999.1.1")

_HOST_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"^{_HOST_LABEL}(?:\.{_HOST_LABEL})*$")
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class PeerIdentity:
    """A verified peer: what the rest of trustmig uses to authorise a request.

    ``fingerprint`` is the SHA-256 of the certificate DER (or of the signed part of a token),
    so audit records can name exactly which credential was used.
    """

    kind: Kind
    name: str
    roles: tuple[str, ...]
    tenant: str | None
    serial: int
    fingerprint: str


def check_kind(kind: str) -> Kind:
    """Return ``kind`` if it is ``"host"`` or ``"user"``."""
    if kind == "host":
        return "host"
    if kind == "user":
        return "user"
    raise InvalidInput(f"unknown credential kind {kind!r}: use 'host' or 'user'")


def check_host_name(name: str) -> str:
    """Validate a host name (lower-case DNS name) used as CN and DNS SAN."""
    if not isinstance(name, str) or len(name) > 253 or not _HOST_RE.match(name):
        raise InvalidInput(
            f"invalid host name {name!r}: use a lower-case DNS name "
            "(letters, digits, '-', dot-separated labels, at most 253 characters)"
        )
    return name


def check_user_name(name: str) -> str:
    """Validate a user name (1-64 characters of letters, digits, ``._@-``)."""
    if not isinstance(name, str) or not _USER_RE.match(name):
        raise InvalidInput(
            f"invalid user name {name!r}: use 1-64 characters of letters, digits, '.', '_', "
            "'@' or '-', starting with a letter or digit"
        )
    return name


def check_tenant(tenant: str | None) -> str | None:
    """Validate an optional tenant name (same alphabet as user names)."""
    if tenant is None:
        return None
    if not isinstance(tenant, str) or not _USER_RE.match(tenant):
        raise InvalidInput(
            f"invalid tenant {tenant!r}: use 1-64 characters of letters, digits, '.', '_', "
            "'@' or '-', or no tenant at all"
        )
    return tenant


def check_name(kind: Kind, name: str) -> str:
    """Validate ``name`` according to the rules of ``kind``."""
    return check_host_name(name) if kind == "host" else check_user_name(name)


def check_roles(roles: Sequence[str]) -> tuple[str, ...]:
    """Validate roles and return them deduplicated in the canonical order of :data:`ROLES`.

    A canonical order makes the extension bytes (and therefore issued certificates) independent
    of the order the operator typed the roles in.
    """
    if isinstance(roles, str):
        raise InvalidInput(
            f"roles must be a list of role names, not the string {roles!r}: e.g. roles=['operator']"
        )
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise InvalidInput(f"unknown role {unknown[0]!r}: valid roles are {', '.join(ROLES)}")
    if not roles:
        raise InvalidInput(f"a user needs at least one role: choose from {', '.join(ROLES)}")
    return tuple(r for r in ROLES if r in roles)


def canonical_json(value: object) -> bytes:
    """Serialise ``value`` deterministically (sorted keys, no spaces, UTF-8)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode_roles_extension(roles: tuple[str, ...], tenant: str | None) -> bytes:
    """DER ``UTF8String`` holding the canonical JSON of roles and tenant.

    Wrapping the JSON in a UTF8String keeps the extension value well-formed DER, so strict
    parsers (GnuTLS in QEMU, OpenSSL) accept certificates that carry it.
    """
    body = canonical_json({"roles": list(roles), "tenant": tenant})
    return b"\x0c" + _der_length(len(body)) + body


def decode_roles_extension(value: bytes) -> tuple[tuple[str, ...], str | None]:
    """Inverse of :func:`encode_roles_extension`; raises ``ValueError`` on malformed input."""
    if len(value) < 2 or value[0] != 0x0C:
        raise ValueError("role extension is not a DER UTF8String")
    length, offset = _parse_der_length(value, 1)
    if offset + length != len(value):
        raise ValueError("role extension has a wrong length")
    data = json.loads(value[offset:].decode())
    if not isinstance(data, dict) or set(data) != {"roles", "tenant"}:
        raise ValueError("role extension must hold exactly 'roles' and 'tenant'")
    roles = data["roles"]
    tenant = data["tenant"]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise ValueError("role extension 'roles' must be a list of strings")
    if tenant is not None and not isinstance(tenant, str):
        raise ValueError("role extension 'tenant' must be a string or null")
    return tuple(roles), tenant


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _parse_der_length(data: bytes, offset: int) -> tuple[int, int]:
    first = data[offset]
    offset += 1
    if first < 0x80:
        return first, offset
    count = first & 0x7F
    if count == 0 or count > 4 or offset + count > len(data):
        raise ValueError("bad DER length")
    return int.from_bytes(data[offset : offset + count], "big"), offset + count
