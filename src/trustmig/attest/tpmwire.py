"""Pure-Python parsing of the few TPM 2.0 wire structures a verifier needs.

The verifier (cluster side) must not depend on libtss2 or on a TPM: it checks evidence with only
`cryptography`. Structures follow TPM 2.0 Part 2 (big-endian, TPM2B = u16 size + bytes).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.attest.errors import AttestError

ALG_SHA256 = 0x000B
ALG_NULL = 0x0010
ALG_ECC = 0x0023
ECC_NIST_P256 = 0x0003
TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_CC_POLICY_PCR = 0x0000017F

# TPMA_OBJECT bits
FIXED_TPM = 1 << 1
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN_ENCRYPT = 1 << 18
AK_REQUIRED_ATTRS = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN_ENCRYPT


class TpmWireError(AttestError):
    """A TPM structure could not be parsed."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.off = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.off : self.off + n]
        if len(chunk) != n:
            raise TpmWireError("truncated TPM structure; the evidence was cut or corrupted")
        self.off += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def tpm2b(self) -> bytes:
        return self.take(self.u16())


@dataclass(frozen=True)
class AkPublic:
    """An ECC attestation key's public area, as the verifier needs it."""

    key: ec.EllipticCurvePublicKey
    attributes: int
    name: bytes  # nameAlg (u16) || H(TPMT_PUBLIC): the TPM "Name" bound by MakeCredential


def parse_ak_public(tpm2b_public: bytes) -> AkPublic:
    """Parse a marshalled TPM2B_PUBLIC holding an ECC P-256 key and compute its Name."""
    outer = _Reader(tpm2b_public)
    body = outer.tpm2b()
    r = _Reader(body)
    key_type, name_alg, attrs = r.u16(), r.u16(), r.u32()
    r.tpm2b()  # authPolicy
    if key_type != ALG_ECC:
        raise TpmWireError(f"AK key type {key_type:#06x} is not ECC; recreate the AK as ECC P-256")
    if name_alg != ALG_SHA256:
        raise TpmWireError(f"AK name algorithm {name_alg:#06x} is not SHA-256; recreate the AK")
    if r.u16() != ALG_NULL:  # symmetric
        r.u16()
        r.u16()
    if r.u16() != ALG_NULL:  # scheme
        r.u16()
    curve = r.u16()
    if r.u16() != ALG_NULL:  # kdf
        r.u16()
    if curve != ECC_NIST_P256:
        raise TpmWireError(f"AK curve {curve:#06x} is not NIST P-256; recreate the AK")
    x = int.from_bytes(r.tpm2b(), "big")
    y = int.from_bytes(r.tpm2b(), "big")
    key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    name = struct.pack(">H", name_alg) + hashlib.sha256(body).digest()
    return AkPublic(key=key, attributes=attrs, name=name)


def check_ak_attributes(attrs: int) -> None:
    """Refuse keys that are not restricted, TPM-bound signing keys: only such a key's signature
    proves the quote was produced inside the TPM from real PCR values."""
    if attrs & AK_REQUIRED_ATTRS != AK_REQUIRED_ATTRS or attrs & DECRYPT:
        raise TpmWireError(
            f"AK attributes {attrs:#x} are not those of a restricted fixedTPM signing key; "
            "recreate the AK"
        )


@dataclass(frozen=True)
class QuoteInfo:
    """The fields of a TPMS_ATTEST of type quote that the verifier checks."""

    magic: int
    type: int
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    pcr_select: list[tuple[int, list[int]]]
    pcr_digest: bytes


def parse_quote_attest(attest: bytes) -> QuoteInfo:
    """Parse a marshalled TPMS_ATTEST; refuses anything not TPM-generated or not a quote."""
    r = _Reader(attest)
    magic, typ = r.u32(), r.u16()
    if magic != TPM_GENERATED_VALUE:
        raise TpmWireError(
            "attestation magic is not TPM_GENERATED; the quote was not made by a TPM"
        )
    if typ != TPM_ST_ATTEST_QUOTE:
        raise TpmWireError(f"attestation type {typ:#06x} is not a quote; send a TPM2_Quote")
    r.tpm2b()  # qualifiedSigner
    extra = r.tpm2b()
    clock, reset, restart = r.u64(), r.u32(), r.u32()
    r.u8()  # safe
    r.u64()  # firmwareVersion
    sels: list[tuple[int, list[int]]] = []
    for _ in range(r.u32()):
        halg, size = r.u16(), r.u8()
        bitmap = r.take(size)
        sels.append((halg, [i for i in range(size * 8) if bitmap[i // 8] & (1 << (i % 8))]))
    digest = r.tpm2b()
    return QuoteInfo(magic, typ, extra, clock, reset, restart, sels, digest)


def marshal_pcr_selection(pcrs: Sequence[int]) -> bytes:
    """TPML_PCR_SELECTION with one sha256 bank selecting `pcrs`."""
    bitmap = bytearray(3)
    for p in pcrs:
        bitmap[p // 8] |= 1 << (p % 8)
    return struct.pack(">IHB", 1, ALG_SHA256, 3) + bytes(bitmap)


def pcr_composite_digest(values: dict[int, bytes]) -> bytes:
    """sha256 over the selected PCR values in ascending index order (what TPM2_Quote signs)."""
    return hashlib.sha256(b"".join(values[i] for i in sorted(values))).digest()


def pcr_policy_digest(values: dict[int, bytes]) -> bytes:
    """PolicyPCR digest of a fresh policy session for the given sha256 PCR values.

    Lets a sealed object be bound to PCR values *predicted* from reference measurements, which is
    how a key is resealed ahead of an authorized software upgrade.
    """
    sel = marshal_pcr_selection(sorted(values))
    return hashlib.sha256(
        bytes(32) + struct.pack(">I", TPM_CC_POLICY_PCR) + sel + pcr_composite_digest(values)
    ).digest()


def extend_value(old: bytes, digest: bytes) -> bytes:
    """PCR extend in the sha256 bank: new = sha256(old || digest)."""
    return hashlib.sha256(old + digest).digest()
