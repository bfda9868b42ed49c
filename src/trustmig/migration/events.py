"""Events fed into the migration cores: frozen facts, each saying what was observed or answered.

The cores never look at sockets, QEMU or clocks; the code around them turns what it sees (a
control answer, a QMP event, a relay report, the result of an action it carried out) into one
of these, and passes the current time alongside.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """Base class of every event."""


# ----------------------------------------------------------------------- decisions and set-up
@dataclass(frozen=True)
class Decided(Event):
    """The source's own decisions (policy, quarantine, admission) on the request."""

    allow: bool
    rule: str
    line: str


@dataclass(frozen=True)
class Prepared(Event):
    """The destination accepted ``incoming.prepare`` and started its paused incoming QEMU."""

    data_address: str
    decision_in: str


@dataclass(frozen=True)
class PeerRefused(Event):
    """The destination answered with a refusal (its own decision): nothing runs there."""

    code: str
    message: str


@dataclass(frozen=True)
class PeerUnreachable(Event):
    """A call to the destination got no answer (connection failed, closed or timed out)."""

    reason: str


@dataclass(frozen=True)
class Attested(Event):
    """The data channel is open: both hosts authenticated, the destination's evidence verified."""

    summary: str
    handshake_ms: float


@dataclass(frozen=True)
class ClaimJudged(Event):
    """The destination's signed resource claim was checked against its attested capacity."""

    accept: bool
    lie: bool
    rule: str
    reason: str


@dataclass(frozen=True)
class DataPathFailed(Event):
    """The data channel could not be opened (handshake, attestation or relay start failed)."""

    reason: str


@dataclass(frozen=True)
class TransferStarted(Event):
    """QEMU accepted the ``migrate`` command."""


@dataclass(frozen=True)
class MemoryStreamStarting(Event):
    """Every disk mirror is ready and QEMU is about to be told to send the memory: from here
    on the destination may come to hold the whole guest (before it, it cannot)."""


@dataclass(frozen=True)
class TransferStartFailed(Event):
    """QEMU refused to start the migration."""

    reason: str


# ----------------------------------------------------------------------- during the transfer
@dataclass(frozen=True)
class Progress(Event):
    """A ``query-migrate`` sample of the local QEMU."""

    status: str
    transferred: int
    remaining: int
    total: int
    rounds: int
    dirty_rate_pps: int = 0
    expected_downtime_ms: int | None = None


@dataclass(frozen=True)
class QemuStatus(Event):
    """The local QEMU's migration status changed (QMP ``MIGRATION`` event or a query)."""

    status: str


@dataclass(frozen=True)
class QemuExited(Event):
    """The local QEMU process is gone."""

    reason: str


@dataclass(frozen=True)
class StreamFailed(Event):
    """A data stream broke (relay report); ``qemu_status`` is QEMU's migration status then."""

    reason: str
    qemu_status: str = "unknown"


@dataclass(frozen=True)
class ControlLost(Event):
    """The control connection to the peer agent closed."""

    reason: str


@dataclass(frozen=True)
class ControlRestored(Event):
    """A control connection to the peer agent is open again."""


@dataclass(frozen=True)
class PostcopySwitchRefused(Event):
    """QEMU refused ``migrate-start-postcopy`` (too late, or not possible)."""

    reason: str


@dataclass(frozen=True)
class RecoveryDone(Event):
    """A broken post-copy stream runs again over a new attested session."""


@dataclass(frozen=True)
class RecoveryFailed(Event):
    """One attempt to re-establish the post-copy stream failed."""

    reason: str


# ----------------------------------------------------------------------- the handover
@dataclass(frozen=True)
class CommitAnswered(Event):
    """The destination confirmed that its guest runs (and journaled itself as owner)."""

    pid: int | None
    epoch: int


@dataclass(frozen=True)
class CommitRefused(Event):
    """The destination answered the commit with a refusal: its guest does not run.

    Only a *definitive* code (``aborted``, ``not_found``, ``refused``) means that; anything else
    (``in_doubt``, a transport failure) is a lost answer."""

    code: str
    message: str


@dataclass(frozen=True)
class CommitLost(Event):
    """The commit was sent, or may have been, but no answer came back."""

    reason: str


@dataclass(frozen=True)
class PeerStatus(Event):
    """The destination's own state of this migration (``incoming.status``); None: unknown."""

    state: str | None
    epoch: int = 0


@dataclass(frozen=True)
class GuestResumed(Event):
    """The local guest was asked to run; ``running`` says whether QEMU now runs it."""

    running: bool
    detail: str = ""
    request_id: int | None = None
    #: the guest's QEMU is gone (it died during the migration): the guest ran nowhere since
    gone: bool = False


# ----------------------------------------------------------------------- destination requests
@dataclass(frozen=True)
class SessionClaimed(Event):
    """An authenticated data session for this migration was accepted by the data listener."""


@dataclass(frozen=True)
class CommitRequested(Event):
    """The source asks the destination to run the guest (``incoming.commit``)."""

    request_id: int


@dataclass(frozen=True)
class AbortRequested(Event):
    """The source asks the destination to discard its incoming guest (``incoming.abort``)."""

    request_id: int
    reason: str


@dataclass(frozen=True)
class RecoverRequested(Event):
    """The source asks the destination to listen for a new post-copy stream."""

    request_id: int


@dataclass(frozen=True)
class RecoverArmed(Event):
    """The destination QEMU listens again (``migrate-recover`` accepted)."""

    request_id: int


@dataclass(frozen=True)
class RecoverArmFailed(Event):
    """The destination QEMU refused ``migrate-recover``."""

    request_id: int
    reason: str


# ----------------------------------------------------------------------- restart and operators
@dataclass(frozen=True)
class Restarted(Event):
    """The agent started again and found this migration in its journal.

    ``qemu_alive``: the journaled QEMU process (same PID and start time) still runs;
    ``qemu_status``: its migration status (``unknown`` if it does not answer); ``relay_alive``:
    the migration's relay process still carries the data path; ``memory_sent``: the journal
    says QEMU may have been told to send the memory (a source's record)."""

    qemu_alive: bool
    qemu_status: str
    relay_alive: bool
    memory_sent: bool = True


@dataclass(frozen=True)
class ResolveRequested(Event):
    """An authorised operator settles a migration left in doubt.

    ``keep``: ``destination`` (the destination's copy is the VM), ``source`` (the destination's
    copy is known gone, run the source's) or ``retry`` (try the automatic resolution now)."""

    keep: str
    user: str
    request_id: int | None = None
