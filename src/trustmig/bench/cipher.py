"""What the channel's cipher alone costs on this machine, measured in the same invocation.

trustmig's data path cannot cost less CPU than sealing the stream on the source and opening it on
the destination; the benchmark reports its added CPU (secure minus plain, both sides) as a
multiple of this floor (``cpu_overhead_vs_cipher``). The floor is measured with the channel's own
record layer (:class:`~trustmig.channel.records.RecordSealer` and ``RecordOpener``, the record
size the relays use) on one thread, in CPU seconds (``thread_time``), so other work on a shared
host slows it but does not inflate it. The best of a few short repetitions is kept: noise only
ever adds.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from trustmig.channel import RecordLimits, SessionKeys
from trustmig.channel.limits import DEFAULT_MAX_PLAINTEXT

GIB = 1024**3
DEFAULT_SAMPLE_BYTES = 128 << 20


@dataclass(frozen=True)
class CipherCost:
    """CPU seconds per GiB of payload to seal (sender) and to open (receiver) records."""

    cipher: str
    record_bytes: int
    seal_cpu_s_per_gib: float
    open_cpu_s_per_gib: float

    @property
    def both_sides_cpu_s_per_gib(self) -> float:
        return self.seal_cpu_s_per_gib + self.open_cpu_s_per_gib

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "both_sides_cpu_s_per_gib": round(self.both_sides_cpu_s_per_gib, 4)}


def _one_pass(cipher: str, record_bytes: int, sample_bytes: int) -> tuple[float, float]:
    """(seal, open) CPU seconds per GiB over ``sample_bytes`` of payload."""
    keys = SessionKeys(master_secret=os.urandom(32), cipher=cipher, n_streams=1,
                       limits=RecordLimits(max_plaintext=record_bytes))  # fmt: skip
    sealer, opener = keys.sealer(0, "c2s"), keys.opener(0, "c2s")
    payload = memoryview(os.urandom(record_bytes))
    sealed = bytearray(sealer.sealed_size(record_bytes))
    plain = memoryview(bytearray(record_bytes))
    head = opener.HEADER_SIZE
    records = max(1, sample_bytes // record_bytes)
    seal_s = open_s = 0.0
    for _ in range(records):
        t0 = time.thread_time()
        n = sealer.seal_into(payload, sealed)
        t1 = time.thread_time()
        view = memoryview(sealed)[:n]
        opener.open_into(view[:head], view[head:], plain)
        open_s += time.thread_time() - t1
        seal_s += t1 - t0
    gib = records * record_bytes / GIB
    return seal_s / gib, open_s / gib


def measure_cipher_cost(
    cipher: str = "aes-256-gcm",
    record_bytes: int = DEFAULT_MAX_PLAINTEXT,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    repeat: int = 3,
) -> CipherCost:
    """The channel cipher's own CPU cost per GiB (best of ``repeat`` passes); raises
    ChannelError for an unknown cipher or a record size outside the channel's limits."""
    passes = [_one_pass(cipher, record_bytes, sample_bytes) for _ in range(max(1, repeat))]
    return CipherCost(
        cipher=cipher,
        record_bytes=record_bytes,
        seal_cpu_s_per_gib=round(min(p[0] for p in passes), 4),
        open_cpu_s_per_gib=round(min(p[1] for p in passes), 4),
    )
