"""Key schedule: HKDF (RFC 5869, SHA-256) with a labelled expand, and per-stream traffic keys.

Every key used by the channel is derived from one X25519 shared secret salted with a transcript
hash, so keys are bound to both identities, both ephemeral keys and the negotiated parameters.
Each (stream, direction, epoch) gets its own key and IV, which is what makes records spliced
between streams or directions fail authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from trustmig.channel.errors import ChannelError

HASH_SIZE = 32
KEY_SIZE = 32
IV_SIZE = 12
TAG_SIZE = 16
LABEL_PREFIX = b"trustmig "

# Cipher identifiers on the wire (ClientHello offers, ServerHello selects).
CIPHER_IDS: dict[str, int] = {"aes-256-gcm": 1, "chacha20-poly1305": 2}
CIPHER_NAMES: dict[int, str] = {v: k for k, v in CIPHER_IDS.items()}

DIRECTIONS: dict[str, int] = {"c2s": 0, "s2c": 1}

AEAD = AESGCM | ChaCha20Poly1305


def cipher_id(name: str) -> int:
    """Map a cipher name to its wire id, rejecting unknown names with a clear message."""
    try:
        return CIPHER_IDS[name]
    except KeyError:
        raise ChannelError(
            f"unknown cipher {name!r}: use one of {', '.join(sorted(CIPHER_IDS))}"
        ) from None


def direction_code(direction: str) -> int:
    """Map "c2s"/"s2c" to its wire code."""
    try:
        return DIRECTIONS[direction]
    except KeyError:
        raise ChannelError(f"unknown direction {direction!r}: use 'c2s' or 's2c'") from None


def make_aead(cipher: str, key: bytes) -> AEAD:
    """Instantiate the AEAD for a negotiated cipher name."""
    if cipher == "aes-256-gcm":
        return AESGCM(key)
    if cipher == "chacha20-poly1305":
        return ChaCha20Poly1305(key)
    raise ChannelError(f"unknown cipher {cipher!r}: use one of {', '.join(sorted(CIPHER_IDS))}")


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-256."""
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand_label(secret: bytes, label: str, context: bytes, length: int) -> bytes:
    """HKDF-Expand with a TLS-1.3-style label so every derived value has a distinct purpose.

    info = u16 length || u8 len(L) || L || u8 len(context) || context, L = "trustmig " + label.
    """
    full = LABEL_PREFIX + label.encode("ascii")
    if len(full) > 255 or len(context) > 255:
        raise ChannelError("key schedule label or context longer than 255 bytes")
    info = struct.pack(">HB", length, len(full)) + full + bytes([len(context)]) + context
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(secret)


@dataclass(frozen=True)
class TrafficKeys:
    """Key material of one (stream, direction, epoch): the AEAD key, IV, and the secret to
    derive the next epoch from."""

    secret: bytes
    epoch: int
    key: bytes
    iv: bytes

    @classmethod
    def from_secret(cls, secret: bytes, epoch: int) -> TrafficKeys:
        key = hkdf_expand_label(secret, "tm key", b"", KEY_SIZE)
        iv = hkdf_expand_label(secret, "tm iv", b"", IV_SIZE)
        return cls(secret=secret, epoch=epoch, key=key, iv=iv)

    def next_epoch(self) -> TrafficKeys:
        """Rekey: the next epoch's secret is expanded from this one, then this one is dropped."""
        if self.epoch >= 0xFFFFFFFF:
            raise ChannelError("key epoch counter exhausted")
        return TrafficKeys.from_secret(
            hkdf_expand_label(self.secret, "tm rekey", b"", HASH_SIZE), self.epoch + 1
        )


def stream_secret(master: bytes, stream: int, direction: str) -> bytes:
    """Epoch-0 traffic secret of one stream and direction."""
    direction_code(direction)
    return hkdf_expand_label(master, f"tm stream {stream} {direction}", b"", HASH_SIZE)
