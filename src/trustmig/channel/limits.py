"""Record-layer limits, shared by sealers and openers of one session.

They bound memory (maximum record) and key usage (rekey volume). Tests shrink them to exercise
key updates cheaply; production keeps the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustmig.channel.errors import ChannelError

DEFAULT_MAX_PLAINTEXT = 256 * 1024
HARD_MAX_PLAINTEXT = 1024 * 1024
DEFAULT_REKEY_BYTES = 1 << 34
DEFAULT_REKEY_RECORDS = 1 << 24


@dataclass(frozen=True)
class RecordLimits:
    """``max_plaintext``: largest DATA payload (<= 1 MiB); the sender starts a new key epoch
    before a DATA record would push the epoch over ``rekey_bytes`` or ``rekey_records``."""

    max_plaintext: int = DEFAULT_MAX_PLAINTEXT
    rekey_bytes: int = DEFAULT_REKEY_BYTES
    rekey_records: int = DEFAULT_REKEY_RECORDS

    def __post_init__(self) -> None:
        if not 1 <= self.max_plaintext <= HARD_MAX_PLAINTEXT:
            raise ChannelError(
                f"max_plaintext {self.max_plaintext} out of range: use 1..{HARD_MAX_PLAINTEXT}"
            )
        if self.rekey_bytes < 1:
            raise ChannelError(f"rekey_bytes {self.rekey_bytes} must be at least 1")
        if not 1 <= self.rekey_records <= DEFAULT_REKEY_RECORDS:
            raise ChannelError(
                f"rekey_records {self.rekey_records} out of range: use 1..{DEFAULT_REKEY_RECORDS}"
            )
