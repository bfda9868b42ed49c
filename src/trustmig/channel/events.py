"""Events returned by :class:`~trustmig.channel.records.RecordOpener` for each verified record."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Data:
    """A verified DATA record of ``length`` plaintext bytes.

    ``open_into`` leaves the plaintext in the caller's buffer and ``payload`` empty; ``feed``
    (the convenience parser) carries a copy in ``payload``.
    """

    length: int
    payload: bytes = b""


@dataclass(frozen=True)
class KeyUpdated:
    """The peer switched to key epoch ``epoch``; later records use the new keys."""

    epoch: int


@dataclass(frozen=True)
class EndOfStream:
    """The peer closed the stream cleanly; counts and digest were verified."""

    total_bytes: int
    records: int


@dataclass(frozen=True)
class Aborted:
    """The peer aborted the stream with an authenticated reason."""

    reason: str


Event = Data | KeyUpdated | EndOfStream | Aborted
