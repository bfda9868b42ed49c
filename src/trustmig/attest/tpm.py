"""Access to one host's TPM through tpm2-pytss (ESAPI).

HostTpm is the agent-side half of the paper's Attestation Service and Seal Storage: it owns the
host identity keys (EK, AK), extends measurements into PCRs, produces quotes and seals keys to the
measured software state. The verifier half lives in `evidence.py` and needs no TPM.

Why it looks like this:
- swtpm (and a raw /dev/tpm0) have no resource manager: the TPM holds only a few transient objects,
  so every transient object and session is flushed in a ``finally`` and the long-lived keys are made
  persistent (EK at 0x81010001, AK at 0x81010002) with EvictControl.
- The AK is ECC P-256: creating it takes ~20 ms, an RSA AK up to a second.
- One ESAPI context is not thread-safe, so every call takes the instance lock.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

# Expected TPM failures (policy mismatch on unseal, probing NV indexes) would otherwise be printed
# by libtss2 on stderr although they are handled here; an operator can still set TSS2_LOG.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HC,
    TPM2_PT,
    TPM2_RC,
    TPM2_SE,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPMA_OBJECT,
    TPMA_SESSION,
    TPML_DIGEST_VALUES,
    TPMS_SENSITIVE_CREATE,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMT_SYM_DEF,
    TPMU_HA,
    TCTILdr,
    TSS2_Exception,
)
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template

from trustmig.attest.errors import AttestError, TpmUnavailable, UnsealRefused
from trustmig.attest.tpmwire import parse_quote_attest, pcr_composite_digest, pcr_policy_digest

if TYPE_CHECKING:
    from trustmig.attest.swtpm import SwtpmProcess

EK_HANDLE = 0x81010001
AK_HANDLE = 0x81010002
EK_CERT_NV_RSA2048 = 0x01C00002
AK_TEMPLATE = "ecc256:ecdsa-sha256:null"
#: Every object trustmig creates is exempt from the dictionary-attack logic (``NODA``): their
#: authorisation is a PCR policy or the empty password of a key that never leaves the TPM, so
#: there is nothing to guess, and an unclean TPM stop (an agent killed, a power cut) must never
#: count towards a lockout that would keep the host from starting its agent.
AK_ATTRS = (
    TPMA_OBJECT.NODA
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
LOCKOUT_MSG = (
    "the TPM is in dictionary-attack lockout (too many failed authorisations or unclean "
    "restarts of objects without NODA): wait for its recovery time, or reset it with the "
    "lockout authorisation (tpm2_dictionarylockout --clear-lockout)"
)
MAX_QUALIFYING_DATA = 64
MAX_SEALED_SECRET = 128  # MAX_SYM_DATA of the reference TPM
SEALED_FORMAT = "trustmig-sealed/1"
UNSEAL_REFUSED_MSG = (
    "unseal refused: PCR state differs from the sealed launch (measured software changed); "
    "run 'trustmig host reseal' after an authorized upgrade"
)
_SYM_NULL = TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL)
_T = TypeVar("_T")


@dataclass(frozen=True)
class TpmKeys:
    """Public parts of a host's TPM identity.

    ``ak_public_tpm`` is the marshalled TPM2B_PUBLIC of the AK: the verifier recomputes the AK Name
    from it and checks the key attributes (restricted, fixedTPM signing key).
    """

    ek_public_pem: bytes
    ak_public_pem: bytes
    ak_name: bytes
    ak_public_tpm: bytes


@dataclass(frozen=True)
class Quote:
    """A TPM2_Quote: ``attest`` is the marshalled TPMS_ATTEST that was signed, ``signature`` the
    ECDSA P-256/SHA-256 signature in DER form (as `cryptography` verifies it), ``pcrs`` the sha256
    PCR values read alongside (their digest equals the one inside ``attest``)."""

    attest: bytes
    signature: bytes
    pcrs: dict[int, bytes]

    def to_dict(self) -> dict[str, Any]:
        return {
            "attest": base64.b64encode(self.attest).decode(),
            "signature": base64.b64encode(self.signature).decode(),
            "pcrs": {str(i): v.hex() for i, v in sorted(self.pcrs.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Quote:
        try:
            return cls(
                attest=base64.b64decode(data["attest"], validate=True),
                signature=base64.b64decode(data["signature"], validate=True),
                pcrs={int(i): bytes.fromhex(v) for i, v in data["pcrs"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AttestError(
                f"malformed quote ({exc.__class__.__name__}: {exc}); send the quote produced by "
                "HostTpm.quote"
            ) from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Quote:
        try:
            data = json.loads(text)
        except ValueError:
            raise AttestError("quote is not valid JSON; send Quote.to_json() output") from None
        if not isinstance(data, dict):
            raise AttestError("quote JSON is not an object; send Quote.to_json() output")
        return cls.from_dict(data)


def _check_pcrs(pcrs: Sequence[int]) -> list[int]:
    out = sorted(set(pcrs))
    if not out:
        raise AttestError("no PCR selected; pass at least one PCR index (0-23)")
    for p in out:
        if not isinstance(p, int) or not 0 <= p <= 23:
            raise AttestError(f"PCR index {p!r} is out of range; use 0-23")
    return out


def _sel(pcrs: Sequence[int]) -> str:
    return "sha256:" + ",".join(str(p) for p in pcrs)


class HostTpm:
    """One open TPM (kernel resource manager or swtpm). Close it to free the connection and, for
    a supervised swtpm, stop the process."""

    def __init__(self, tcti: str, *, kind: str, process: SwtpmProcess | None = None) -> None:
        name, _, conf = tcti.partition(":")
        try:
            self._ectx = ESAPI(TCTILdr(name, conf or None))
        except TSS2_Exception as exc:
            raise TpmUnavailable(
                f"cannot open TPM via TCTI {tcti!r} ({exc}); check the device or swtpm"
            ) from None
        self.kind = kind
        self.tcti = tcti
        self._process = process
        self._lock = threading.RLock()
        self._closed = False
        self._flush_transients()
        #: Failed authorisations the TPM had counted when it was opened (reset on a swtpm).
        self.lockout_reset = self._clear_swtpm_lockout()

    # --- housekeeping ---------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._ectx.close()
            finally:
                if self._process is not None:
                    self._process.stop()

    def __enter__(self) -> HostTpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run one TPM operation under the lock, turning TSS errors into one-line AttestErrors."""
        with self._lock:
            if self._closed:
                raise AttestError(f"{what}: TPM connection is closed; open the TPM again")
            try:
                return fn()
            except AttestError:
                raise
            except TSS2_Exception as exc:
                raise AttestError(
                    f"{what} failed in the TPM ({exc}); check the TPM state"
                ) from None

    def _flush_transients(self) -> None:
        """Drop objects/sessions a crashed client left behind (no resource manager on swtpm)."""
        if self.kind == "device":
            return  # the kernel resource manager owns transient handles there
        for first in (
            TPM2_HC.TRANSIENT_FIRST,
            TPM2_HC.LOADED_SESSION_FIRST,
            TPM2_HC.POLICY_SESSION_FIRST,
        ):
            _, data = self._ectx.get_capability(TPM2_CAP.HANDLES, first, 64)
            for h in data.data.handles:
                try:
                    self._ectx.flush_context(self._ectx.tr_from_tpmpublic(h))
                except TSS2_Exception:
                    continue

    def lockout_counter(self) -> int:
        """How many failures the dictionary-attack logic currently counts."""
        _, data = self._ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
        for prop in data.data.tpmProperties:
            if prop.property == TPM2_PT.LOCKOUT_COUNTER:
                return int(prop.value)
        return 0

    def _clear_swtpm_lockout(self) -> int:
        """A supervised swtpm belongs to this host's agent, whose lockout authorisation is the
        empty one: counted failures (older objects without NODA, unclean stops) are cleared at
        open, and their number is returned for the audit trail. A hardware TPM is left alone."""
        if self.kind != "swtpm":
            return 0
        try:
            n = self.lockout_counter()
            if n:
                self._ectx.dictionary_attack_lock_reset(ESYS_TR.LOCKOUT)
            return n
        except TSS2_Exception:
            return 0

    def _persistent_handles(self) -> list[int]:
        _, data = self._ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HC.PERSISTENT_FIRST, 64)
        return [int(h) for h in data.data.handles]

    @contextmanager
    def _flushing(self, *handles: ESYS_TR) -> Iterator[None]:
        try:
            yield
        finally:
            for h in handles:
                try:
                    self._ectx.flush_context(h)
                except TSS2_Exception:
                    continue

    def _ek_policy_session(self) -> ESYS_TR:
        """Policy session satisfying the default EK policy (PolicySecret on the endorsement)."""
        s = self._ectx.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, _SYM_NULL, TPM2_ALG.SHA256
        )
        self._ectx.policy_secret(ESYS_TR.ENDORSEMENT, s)
        return s

    # --- identity -------------------------------------------------------------------------------
    def _ek(self) -> ESYS_TR:
        if EK_HANDLE in self._persistent_handles():
            return self._ectx.tr_from_tpmpublic(EK_HANDLE)
        _, template = create_ek_template("EK-RSA2048", NVReadEK(self._ectx))
        transient, *_ = self._ectx.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        with self._flushing(transient):
            return self._ectx.evict_control(ESYS_TR.OWNER, transient, EK_HANDLE)

    def _ak(self, ek: ESYS_TR) -> ESYS_TR:
        if AK_HANDLE in self._persistent_handles():
            return self._ectx.tr_from_tpmpublic(AK_HANDLE)
        template = TPM2B_PUBLIC(
            publicArea=TPMT_PUBLIC.parse(AK_TEMPLATE, objectAttributes=AK_ATTRS)
        )
        s = self._ek_policy_session()
        with self._flushing(s):
            priv, pub, *_ = self._ectx.create(ek, None, template, session1=s)
        s = self._ek_policy_session()
        with self._flushing(s):
            transient = self._ectx.load(ek, priv, pub, session1=s)
        # EvictControl copies the object; the transient copy must still be flushed.
        with self._flushing(transient):
            return self._ectx.evict_control(ESYS_TR.OWNER, transient, AK_HANDLE)

    def ensure_keys(self) -> TpmKeys:
        """Create (once) the persistent EK and ECC AK and return their public parts."""

        def run() -> TpmKeys:
            ek = self._ek()
            ak = self._ak(ek)
            ek_pub, _, _ = self._ectx.read_public(ek)
            ak_pub, ak_name, _ = self._ectx.read_public(ak)
            return TpmKeys(
                ek_public_pem=bytes(ek_pub.publicArea.to_pem()),
                ak_public_pem=bytes(ak_pub.publicArea.to_pem()),
                ak_name=bytes(ak_name),
                ak_public_tpm=bytes(ak_pub.marshal()),
            )

        return self._call("creating the EK/AK", run)

    def ek_certificate(self) -> bytes | None:
        """DER EK certificate from NV (0x01C00002), or None when the TPM was shipped without one."""

        def run() -> bytes | None:
            try:
                return NVReadEK(self._ectx)(EK_CERT_NV_RSA2048)
            except NoSuchIndex:
                return None

        return self._call("reading the EK certificate", run)

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the persistent AK and EK: only this TPM, holding both the
        EK private key and an AK with the Name the challenger used, can recover the secret."""
        try:
            cred, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            sec, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        except Exception:
            raise AttestError(
                "credential challenge is malformed; send the bytes produced by make_credential"
            ) from None

        def run() -> bytes:
            handles = self._persistent_handles()
            if EK_HANDLE not in handles or AK_HANDLE not in handles:
                raise AttestError("TPM has no EK/AK yet; call ensure_keys() before enrolling")
            ek = self._ectx.tr_from_tpmpublic(EK_HANDLE)
            ak = self._ectx.tr_from_tpmpublic(AK_HANDLE)
            s = self._ek_policy_session()
            with self._flushing(s):
                try:
                    out = self._ectx.activate_credential(
                        ak, ek, cred, sec, session1=ESYS_TR.PASSWORD, session2=s
                    )
                except TSS2_Exception as exc:
                    raise AttestError(
                        f"credential activation refused by the TPM ({exc.error:#x}): the challenge "
                        "was made for another EK or another AK; re-run enrollment against this host"
                    ) from None
            return bytes(out)

        return self._call("activating the credential", run)

    # --- PCRs -----------------------------------------------------------------------------------
    def _pcr_read_locked(self, pcrs: list[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for i in range(0, len(pcrs), 8):  # a TPML_DIGEST carries at most 8 digests
            chunk = pcrs[i : i + 8]
            _, _, digests = self._ectx.pcr_read(_sel(chunk))
            values = [bytes(d) for d in digests]
            if len(values) != len(chunk):
                raise AttestError(
                    f"TPM returned {len(values)} values for PCRs {chunk}; "
                    "activate the sha256 PCR bank"
                )
            out.update(zip(chunk, values, strict=True))
        return out

    def pcr_read(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        """Current sha256-bank values of `pcrs`."""
        sel = _check_pcrs(pcrs)
        return self._call("reading PCRs", lambda: self._pcr_read_locked(sel))

    def extend(self, pcr: int, digest: bytes) -> None:
        """Extend a sha256 digest (already the measurement) into `pcr`."""
        (p,) = _check_pcrs([pcr])
        if len(digest) != 32:
            raise AttestError(f"extend digest is {len(digest)} bytes; pass a 32-byte sha256 digest")
        values = TPML_DIGEST_VALUES(
            [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))]
        )
        self._call(
            f"extending PCR {p}",
            lambda: self._ectx.pcr_extend(getattr(ESYS_TR, f"PCR{p}"), values),
        )

    def reset_pcr(self, pcr: int) -> None:
        """Reset a resettable PCR (16 or 23 at locality 0); used only to rehearse in tests."""
        if pcr not in (16, 23):
            raise AttestError(f"PCR {pcr} is not resettable at locality 0; only 16 and 23 are")
        self._call(
            f"resetting PCR {pcr}", lambda: self._ectx.pcr_reset(getattr(ESYS_TR, f"PCR{pcr}"))
        )

    # --- quote ----------------------------------------------------------------------------------
    def quote(self, qualifying_data: bytes, pcrs: Sequence[int]) -> Quote:
        """Quote `pcrs` with the AK over `qualifying_data` (e.g. the channel transcript hash)."""
        if not 0 < len(qualifying_data) <= MAX_QUALIFYING_DATA:
            raise AttestError(
                f"qualifying data is {len(qualifying_data)} bytes; pass 1-{MAX_QUALIFYING_DATA} "
                "bytes (the 32-byte transcript hash)"
            )
        sel = _check_pcrs(pcrs)

        def run() -> Quote:
            if AK_HANDLE not in self._persistent_handles():
                raise AttestError("TPM has no AK; enroll the host (ensure_keys) before quoting")
            ak = self._ectx.tr_from_tpmpublic(AK_HANDLE)
            for _ in range(3):  # a concurrent extend between read and quote: read again
                values = self._pcr_read_locked(sel)
                attest, sig = self._ectx.quote(ak, _sel(sel), qualifying_data)
                raw = bytes(attest)
                if parse_quote_attest(raw).pcr_digest == pcr_composite_digest(values):
                    ecdsa = sig.signature.ecdsa
                    der = encode_dss_signature(
                        int.from_bytes(bytes(ecdsa.signatureR), "big"),
                        int.from_bytes(bytes(ecdsa.signatureS), "big"),
                    )
                    return Quote(attest=raw, signature=der, pcrs=values)
            raise AttestError("PCRs kept changing while quoting; retry once measurements settle")

        return self._call("quoting", run)

    # --- sealed storage -------------------------------------------------------------------------
    def _srk(self) -> ESYS_TR:
        """Storage primary key under the owner hierarchy; re-derived deterministically each time."""
        template = TPM2B_PUBLIC(
            publicArea=TPMT_PUBLIC.parse(
                "ecc256:aes128cfb",
                objectAttributes=TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS
                | TPMA_OBJECT.NODA,
            )
        )
        handle, *_ = self._ectx.create_primary(None, template, ESYS_TR.OWNER)
        return handle

    def seal(
        self, secret: bytes, pcrs: Sequence[int], *, pcr_values: dict[int, bytes] | None = None
    ) -> bytes:
        """Seal `secret` so that only this TPM, with `pcrs` at the current values (or at
        `pcr_values`, predicted for an upgrade), can unseal it. Returns bytes to store as a file."""
        if not 0 < len(secret) <= MAX_SEALED_SECRET:
            raise AttestError(
                f"secret is {len(secret)} bytes; "
                f"seal 1-{MAX_SEALED_SECRET} bytes (e.g. a 32-byte key)"
            )
        sel = _check_pcrs(pcrs)
        if pcr_values is not None and (
            sorted(pcr_values) != sel or any(len(v) != 32 for v in pcr_values.values())
        ):
            raise AttestError(
                f"pcr_values must hold a 32-byte value for each of PCRs {sel}; fix the prediction"
            )

        def run() -> bytes:
            values = pcr_values if pcr_values is not None else self._pcr_read_locked(sel)
            policy = pcr_policy_digest(values)
            template = TPMT_PUBLIC.parse(
                "keyedhash",
                objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.NODA,
                authPolicy=policy,
            )  # no USERWITHAUTH: only the PCR policy can authorize unsealing
            sensitive = TPM2B_SENSITIVE_CREATE(
                TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(secret))
            )
            srk = self._srk()
            with self._flushing(srk):
                priv, pub, *_ = self._ectx.create(srk, sensitive, TPM2B_PUBLIC(publicArea=template))
            doc = {
                "format": SEALED_FORMAT,
                "pcrs": sel,
                "policy": policy.hex(),
                "public": base64.b64encode(bytes(pub.marshal())).decode(),
                "private": base64.b64encode(bytes(priv.marshal())).decode(),
            }
            return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"

        return self._call("sealing", run)

    def unseal(self, blob: bytes) -> bytes:
        """Recover a sealed secret; refused (UnsealRefused) when the PCRs differ from the seal."""
        try:
            doc = json.loads(blob)
            if doc.get("format") != SEALED_FORMAT:
                raise ValueError("format")
            sel = _check_pcrs([int(p) for p in doc["pcrs"]])
            pub, _ = TPM2B_PUBLIC.unmarshal(base64.b64decode(doc["public"], validate=True))
            priv, _ = TPM2B_PRIVATE.unmarshal(base64.b64decode(doc["private"], validate=True))
        except AttestError:
            raise
        except Exception:
            raise AttestError(
                f"sealed blob is not a {SEALED_FORMAT} document; pass the bytes returned by seal()"
            ) from None

        def run() -> bytes:
            srk = self._srk()
            with self._flushing(srk):
                try:
                    obj = self._ectx.load(srk, priv, pub)
                except TSS2_Exception as exc:
                    if exc.error == TPM2_RC.LOCKOUT:
                        raise AttestError(LOCKOUT_MSG) from None
                    raise AttestError(
                        "sealed blob cannot be loaded by this TPM (sealed on another host or TPM "
                        "cleared); seal the secret again on this host"
                    ) from None
                # Salted session, encrypted response: the secret never crosses the bus in clear.
                s = self._ectx.start_auth_session(
                    srk,
                    ESYS_TR.NONE,
                    TPM2_SE.POLICY,
                    TPMT_SYM_DEF.parse("aes128cfb"),
                    TPM2_ALG.SHA256,
                )
                with self._flushing(s, obj):
                    self._ectx.trsess_set_attributes(
                        s, TPMA_SESSION.ENCRYPT | TPMA_SESSION.CONTINUESESSION
                    )
                    self._ectx.policy_pcr(s, b"", _sel(sel))
                    try:
                        return bytes(self._ectx.unseal(obj, session1=s))
                    except TSS2_Exception as exc:
                        if exc.error == TPM2_RC.POLICY_FAIL:
                            raise UnsealRefused(UNSEAL_REFUSED_MSG) from None
                        raise

        return self._call("unsealing", run)
