"""Actions the migration cores ask for: data, carried out in order by the code around them.

``Persist`` always comes first in a list that changes the state: the journal must hold the new
state (fsynced) before anything the new state allows is done, so that an agent killed at any
instant restarts from a state that is never ahead of what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Action:
    """Base class of every action."""


@dataclass(frozen=True)
class Persist(Action):
    """Write the core's record (state, epoch, error) to the host journal, synced."""


@dataclass(frozen=True)
class Audit(Action):
    """Append an event to the host's signed audit trail."""

    kind: str
    outcome: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Emit(Action):
    """Tell the user who asked for the migration (a ``phase`` or ``progress`` event)."""

    event: dict[str, Any]


@dataclass(frozen=True)
class CallPeer(Action):
    """Call the peer agent: ``prepare``, ``commit``, ``abort``, ``status`` or ``recover``."""

    op: str
    reason: str = ""


@dataclass(frozen=True)
class Reconnect(Action):
    """Open a new control connection to the peer agent (one attempt)."""


@dataclass(frozen=True)
class OpenDataPath(Action):
    """Handshake, attest and hand the streams to a relay process; then judge the resource claim."""


@dataclass(frozen=True)
class RecoverStream(Action):
    """Re-establish a broken post-copy stream: ``incoming.recover``, a new attested session,
    ``migrate resume``; answers with :class:`RecoveryDone` or :class:`RecoveryFailed`."""

    attempt: int


@dataclass(frozen=True)
class StartTransfer(Action):
    """Configure the source QEMU and start its migration into the data path."""


@dataclass(frozen=True)
class StartPostcopy(Action):
    """Switch the running migration to post-copy (``migrate-start-postcopy``)."""


@dataclass(frozen=True)
class CancelTransfer(Action):
    """Cancel QEMU's migration (``migrate_cancel``) and close the data path."""


@dataclass(frozen=True)
class ResumeGuest(Action):
    """Make the local guest run (``cont``); answers with :class:`GuestResumed`."""

    request_id: int | None = None


@dataclass(frozen=True)
class KeepPaused(Action):
    """The local guest must stay paused: its fate is decided elsewhere (logged, no QMP)."""

    reason: str


@dataclass(frozen=True)
class Conclude(Action):
    """After the handover: stop the source copy, tell the destination, exchange receipts."""


@dataclass(frozen=True)
class KillIncoming(Action):
    """Discard the destination's incoming QEMU (only ever before the handover)."""

    reason: str


@dataclass(frozen=True)
class AdoptGuest(Action):
    """The destination's guest becomes one of the host's VMs at ``epoch``."""

    epoch: int


@dataclass(frozen=True)
class ArmRecover(Action):
    """Let the destination QEMU listen for a new post-copy stream (``migrate-recover``)."""

    request_id: int


@dataclass(frozen=True)
class Quarantine(Action):
    """Put a lying host in quarantine."""

    host: str
    reason: str


@dataclass(frozen=True)
class ReleaseAdmission(Action):
    """Give back this migration's admission slot; a ``completed`` one counts in the VM's
    hourly migration limit, an aborted or refused one does not."""

    completed: bool = False


@dataclass(frozen=True)
class Reply(Action):
    """Answer a peer's request that is waiting on this core."""

    request_id: int
    ok: bool
    code: str = ""
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Finish(Action):
    """Report the outcome to whoever waits for the migration (once)."""

    outcome: str
    error: str | None = None
