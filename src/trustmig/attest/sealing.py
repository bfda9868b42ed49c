"""Resealing ahead of an authorized upgrade (Seal Storage + Migration Service).

A key sealed to the launch PCRs cannot be unsealed after the measured software changes, which is
the point. For an approved upgrade the admin reseals *before* rebooting into the new software: the
secret is unsealed while the old PCR values still hold and sealed again to the PCR values the new
event log will produce (predicted by replay), so the host can unseal after the upgrade and a
non-approved change still cannot.
"""

from __future__ import annotations

from collections.abc import Sequence

from trustmig.attest.errors import AttestError
from trustmig.attest.measure import PCR_MAP, EventLog, MeasurementEvent
from trustmig.attest.tpm import HostTpm

_ZERO = bytes(32)


def predict_pcrs(
    items: Sequence[tuple[str, bytes, str]], pcrs: Sequence[int], pcr_map: dict[str, int] = PCR_MAP
) -> dict[int, bytes]:
    """PCR values a fresh measured launch of `items` will produce for `pcrs`."""
    try:
        log = EventLog([MeasurementEvent(pcr_map[n], n, d, detail) for n, d, detail in items])
    except KeyError as exc:
        raise AttestError(
            f"measurement {exc.args[0]!r} has no PCR; add it to the PCR map"
        ) from None
    replayed = log.replay()
    return {p: replayed.get(p, _ZERO) for p in sorted(set(pcrs))}


def reseal(tpm: HostTpm, blob: bytes, new_pcr_values: dict[int, bytes]) -> bytes:
    """Unseal `blob` now and seal the same secret to `new_pcr_values` (e.g. from predict_pcrs)."""
    secret = tpm.unseal(blob)
    return tpm.seal(secret, sorted(new_pcr_values), pcr_values=new_pcr_values)
