"""The source side of a migration: the owner of the VM until the handover.

Order (pre-copy): decisions → ``incoming.prepare`` → data channel (handshake, attestation, claim)
→ QEMU transfer → ``completed`` → commit → the destination's "running" answer → the handover is
complete and only then is the source copy stopped. Post-copy: the switch itself is the handover
(the destination runs the guest from then on), so it is journaled *before* QEMU is told.

Safety rules, each a unit test by name:
- a lost commit answer never resumes the source guest (only a definitive refusal does);
- after the post-copy switch nothing kills or cancels either guest;
- a source that has handed over can never run its guest again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from trustmig.migration import events as ev
from trustmig.migration.actions import (
    Action,
    Audit,
    CallPeer,
    CancelTransfer,
    Conclude,
    Emit,
    Finish,
    KeepPaused,
    OpenDataPath,
    Quarantine,
    Reconnect,
    RecoverStream,
    ReleaseAdmission,
    Reply,
    ResumeGuest,
    StartPostcopy,
    StartTransfer,
)
from trustmig.migration.core import MigrationCore


class SourceState(StrEnum):
    REQUESTED = "requested"
    PREPARING = "preparing"
    HANDSHAKE = "handshake"
    TRANSFER = "transfer"
    POSTCOPY_SWITCHING = "postcopy-switching"
    POSTCOPY = "postcopy"
    POSTCOPY_PAUSED = "postcopy-paused"
    AWAITING_PEER = "awaiting-peer"
    COMMITTING = "committing"
    ROLLING_BACK = "rolling-back"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled-back"
    REFUSED = "refused"
    FAILED = "failed"


S = SourceState

#: The migration is over; nothing it does changes any more.
TERMINAL = frozenset({S.COMPLETED, S.ROLLED_BACK, S.REFUSED, S.FAILED})
#: An admission slot, a data path or a peer's incoming QEMU may be held.
HOLDS_RESOURCES = frozenset(set(S) - TERMINAL - {S.REQUESTED})
#: The current copy may already be the destination's: the source guest stays paused and
#: nothing is killed until the peer's answer (or an operator) settles it.
IN_DOUBT = frozenset({S.POSTCOPY_SWITCHING, S.COMMITTING, S.POSTCOPY_PAUSED})
#: The destination owns the VM: the source guest must never run again.
HANDED_OVER = frozenset({S.POSTCOPY, S.POSTCOPY_PAUSED, S.COMPLETED})
#: States in which the source copy may be stopped (only after the handover completed).
GUEST_MAY_BE_KILLED = frozenset({S.COMPLETED})
#: States in which the source guest may be asked to run again (rolling back).
GUEST_MAY_RESUME = frozenset({S.ROLLING_BACK})
#: QEMU has started sending the guest (its migration must be cancelled to roll back).
QEMU_MIGRATING = frozenset({S.TRANSFER, S.POSTCOPY_SWITCHING, S.POSTCOPY, S.POSTCOPY_PAUSED})

TRANSITIONS: Mapping[SourceState, frozenset[SourceState]] = {
    S.REQUESTED: frozenset({S.PREPARING, S.REFUSED, S.ROLLED_BACK, S.FAILED}),
    S.PREPARING: frozenset({S.HANDSHAKE, S.REFUSED, S.ROLLED_BACK, S.FAILED}),
    S.HANDSHAKE: frozenset({S.TRANSFER, S.ROLLED_BACK, S.FAILED}),
    S.TRANSFER: frozenset(
        {
            S.POSTCOPY_SWITCHING,
            S.POSTCOPY,
            S.POSTCOPY_PAUSED,
            S.AWAITING_PEER,
            S.COMMITTING,
            S.ROLLING_BACK,
            S.FAILED,
        }
    ),
    S.POSTCOPY_SWITCHING: frozenset(
        {
            S.POSTCOPY,
            S.POSTCOPY_PAUSED,
            S.TRANSFER,
            S.COMMITTING,
            S.AWAITING_PEER,
            S.ROLLING_BACK,
            S.FAILED,
        }
    ),
    S.POSTCOPY: frozenset({S.POSTCOPY_PAUSED, S.COMPLETED, S.FAILED}),
    S.POSTCOPY_PAUSED: frozenset({S.POSTCOPY, S.COMPLETED, S.FAILED}),
    S.AWAITING_PEER: frozenset({S.COMMITTING, S.COMPLETED, S.ROLLING_BACK, S.FAILED}),
    S.COMMITTING: frozenset({S.COMPLETED, S.ROLLING_BACK, S.FAILED}),
    S.ROLLING_BACK: frozenset({S.ROLLED_BACK, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.ROLLED_BACK: frozenset(),
    S.REFUSED: frozenset(),
    S.FAILED: frozenset(),
}

#: Codes of a commit refusal that prove the destination's guest does not run.
DEFINITIVE_REFUSALS = frozenset({"aborted", "not_found", "refused"})
#: Destination states (``incoming.status``) that mean it owns the VM.
PEER_OWNS = frozenset({"committed", "postcopy", "postcopy-paused", "recovering"})
#: Destination states that mean it may still load and commit.
PEER_LOADING = frozenset({"receiving", "loaded"})
FAILED_QEMU = frozenset({"failed", "cancelled", "none"})


@dataclass(frozen=True)
class SourcePlan:
    """What the source core needs to know of the request and the host's settings."""

    postcopy: bool = False
    postcopy_after_rounds: int = 2
    postcopy_if_not_converging: bool = True
    timeout_s: float = 600.0
    stall_timeout_s: float = 30.0
    #: How long the destination agent may stay unreachable before a pre-copy is rolled back.
    peer_grace_s: float = 60.0
    #: Pause between attempts to reach the destination agent while in doubt.
    retry_s: float = 2.0
    retry_max_s: float = 30.0
    #: After this long in doubt the requester is told so (the migration goes on resolving).
    doubt_report_s: float = 120.0
    max_recoveries: int = 5
    progress_interval_s: float = 0.2


@dataclass
class _Track:
    """Per-transfer bookkeeping (not journaled: rebuilt from QEMU after a restart)."""

    last_bytes: int = -1
    remaining: list[int] = field(default_factory=list)
    last_emit: float = float("-inf")


class SourceCore(MigrationCore[SourceState]):
    """Sans-IO source migration: feed events, carry out the returned actions."""

    role = "source"
    TRANSITIONS = TRANSITIONS
    TERMINAL = TERMINAL

    def __init__(
        self,
        migration_id: str,
        vm: str,
        destination: str,
        epoch: int,
        plan: SourcePlan | None = None,
        state: SourceState = S.REQUESTED,
    ) -> None:
        super().__init__(migration_id, vm, destination, state, epoch)
        self.plan = plan or SourcePlan()
        self.peer_reachable = True
        self.source_gone = False
        self.recoveries = 0
        self.recovering = False
        self.reported = False
        self.postcopy_switched = False
        #: QEMU may have been told to send the memory (until then the destination holds no
        #: complete guest, whatever it says)
        self.memory_sent = False
        self.retry_delay = self.plan.retry_s
        self.evidence = ""
        self._track = _Track()

    # ------------------------------------------------------------------ helpers
    def _end(
        self,
        new: SourceState,
        now: float,
        error: str | None = None,
        before_finish: tuple[Action, ...] = (),
    ) -> list[Action]:
        """Enter a terminal state: journal, audit, release, report once (``before_finish``:
        what must be done before the requester hears the outcome)."""
        if error and self.error is None:
            self.error = error
        acts = self._enter(new, now, error or "")
        acts += [*before_finish, ReleaseAdmission(completed=new == S.COMPLETED)]
        acts += self._finish(new.value, self.error)
        return acts

    def _finish(self, outcome: str, error: str | None) -> list[Action]:
        if self.reported:
            return []
        self.reported = True
        return [Finish(outcome, error)]

    def _rollback(self, now: float, reason: str) -> list[Action]:
        """Undo a migration that has not been handed over: stop QEMU sending, run the guest."""
        if self.error is None:
            self.error = reason
        migrating = self.state in QEMU_MIGRATING or self.state == S.AWAITING_PEER
        acts = self._enter(S.ROLLING_BACK, now, reason)
        if migrating:
            acts.append(CancelTransfer())
        acts += [ResumeGuest(), CallPeer("abort", reason)]
        return acts

    def _abandon(
        self, now: float, reason: str, before_finish: tuple[Action, ...] = ()
    ) -> list[Action]:
        """Before QEMU sent anything: nothing to undo here, tell the destination."""
        return [*self._end(S.ROLLED_BACK, now, reason, before_finish), CallPeer("abort", reason)]

    def _lost(self, now: float, reason: str) -> list[Action]:
        """The source copy is gone before the handover could complete."""
        return [*self._end(S.FAILED, now, reason), CallPeer("abort", reason)]

    @property
    def handover_epoch(self) -> int:
        """The VM's epoch at the destination once handed over (one more than at the start)."""
        return self.epoch + 1

    def _handed_over(self, now: float, reason: str) -> list[Action]:
        acts = self._enter(S.COMPLETED, now, reason, epoch=self.handover_epoch)
        acts += [Conclude(), ReleaseAdmission(completed=True), *self._finish("completed", None)]
        return acts

    def _commit(self, now: float) -> list[Action]:
        acts = self._enter(S.COMMITTING, now)
        self.timers.set("doubt", now + self.plan.doubt_report_s)
        return [*acts, KeepPaused("commit sent: the destination may run the guest"),
                CallPeer("commit")]  # fmt: skip

    def _schedule_retry(self, now: float) -> list[Action]:
        self.timers.set("retry", now + self.retry_delay)
        self.retry_delay = min(self.retry_delay * 2, self.plan.retry_max_s)
        return []

    def _postcopy_entered(self, now: float, paused: bool) -> list[Action]:
        self.postcopy_switched = True
        self.timers.cancel("overall", "stall", "peer")
        acts = (
            self._enter(S.POSTCOPY, now, epoch=self.handover_epoch)
            if self.state != S.POSTCOPY
            else []
        )
        if paused:
            acts += self._pause(now, "post-copy stream paused")
        return acts

    def _pause(self, now: float, reason: str) -> list[Action]:
        acts = self._enter(S.POSTCOPY_PAUSED, now, reason)
        acts.append(KeepPaused("post-copy stream broken: both sides keep their halves"))
        return acts + self._start_recovery(now)

    def _start_recovery(self, now: float) -> list[Action]:
        if self.recovering:
            return []
        if self.recoveries >= self.plan.max_recoveries:
            self.timers.set("recover", now + self.plan.retry_max_s)
            if not self.reported:
                line = (
                    f"post-copy stream could not be recovered after {self.recoveries} attempts; "
                    f"the guest is kept paused on {self.peer} and its missing pages here (in "
                    "doubt): neither copy is killed, retries continue"
                )
                return self._finish("in-doubt", line)
            return []
        self.recovering = True
        self.recoveries += 1
        return [RecoverStream(self.recoveries)]

    # ------------------------------------------------------------------ handlers
    def handlers(self) -> Mapping[type[ev.Event], Callable[[Any, float], list[Action]]]:
        return {
            ev.Decided: self._on_decided,
            ev.Prepared: self._on_prepared,
            ev.PeerRefused: self._on_peer_refused,
            ev.PeerUnreachable: self._on_peer_unreachable,
            ev.Attested: self._on_attested,
            ev.ClaimJudged: self._on_claim,
            ev.DataPathFailed: self._on_data_path_failed,
            ev.MemoryStreamStarting: self._on_memory_stream_starting,
            ev.TransferStartFailed: self._on_transfer_start_failed,
            ev.Progress: self._on_progress,
            ev.QemuStatus: self._on_qemu_status,
            ev.StreamFailed: self._on_stream_failed,
            ev.QemuExited: self._on_qemu_exited,
            ev.ControlLost: self._on_control_lost,
            ev.ControlRestored: self._on_control_restored,
            ev.PostcopySwitchRefused: self._on_switch_refused,
            ev.RecoveryDone: self._on_recovery_done,
            ev.RecoveryFailed: self._on_recovery_failed,
            ev.CommitAnswered: self._on_commit_answered,
            ev.CommitRefused: self._on_commit_refused,
            ev.CommitLost: self._on_commit_lost,
            ev.PeerStatus: self._on_peer_status,
            ev.GuestResumed: self._on_guest_resumed,
            ev.Restarted: self._on_restarted,
            ev.ResolveRequested: self._on_resolve,
        }

    def _terminal_accepts(self, event: ev.Event) -> bool:
        return isinstance(event, ev.ResolveRequested)

    def _on_decided(self, e: ev.Decided, now: float) -> list[Action]:
        if self.state != S.REQUESTED:
            return []
        if not e.allow:
            return self._end(S.REFUSED, now, e.line)
        acts = self._enter(S.PREPARING, now, rule=e.rule)
        return [*acts, Emit({"event": "phase", "phase": "prepare"}), CallPeer("prepare")]

    def _on_prepared(self, e: ev.Prepared, now: float) -> list[Action]:
        if self.state != S.PREPARING:
            return []
        acts = self._enter(S.HANDSHAKE, now, data_address=e.data_address)
        phase = {"event": "phase", "phase": "handshake", "data_address": e.data_address}
        return [*acts, Emit(phase), OpenDataPath()]

    def _on_peer_refused(self, e: ev.PeerRefused, now: float) -> list[Action]:
        if self.state != S.PREPARING:
            return []
        return self._end(S.REFUSED, now, e.message)

    def _on_peer_unreachable(self, e: ev.PeerUnreachable, now: float) -> list[Action]:
        if self.state == S.PREPARING:
            return self._abandon(now, f"destination {self.peer} unreachable: {e.reason}")
        if self.state in (S.AWAITING_PEER, S.COMMITTING, S.TRANSFER) or self.state in (
            S.POSTCOPY_SWITCHING, S.POSTCOPY, S.POSTCOPY_PAUSED
        ):  # fmt: skip
            self.peer_reachable = False
            return self._schedule_retry(now)
        return []

    def _on_attested(self, e: ev.Attested, now: float) -> list[Action]:
        if self.state != S.HANDSHAKE:
            return []
        self.evidence = e.summary
        data = {"peer": self.peer, "handshake_ms": round(e.handshake_ms, 2)}
        return [Audit("attest.result", e.summary, data)]

    def _on_claim(self, e: ev.ClaimJudged, now: float) -> list[Action]:
        if self.state != S.HANDSHAKE:
            return []
        if not e.accept:
            what = "refused and quarantined" if e.lie else "refused"
            line = f"destination {self.peer} {what}: {e.reason} ({e.rule}); no memory was sent"
            quarantine = (Quarantine(self.peer, f"{e.rule}: {e.reason}"),) if e.lie else ()
            return self._abandon(now, line, quarantine)
        acts = self._enter(S.TRANSFER, now)
        self.timers.set("overall", now + self.plan.timeout_s)
        self.timers.set("stall", now + self.plan.stall_timeout_s)
        self._track = _Track()
        return [*acts, StartTransfer(), Emit({"event": "phase", "phase": "transfer"})]

    def _on_data_path_failed(self, e: ev.DataPathFailed, now: float) -> list[Action]:
        if self.state != S.HANDSHAKE:
            return []
        return self._abandon(now, e.reason)

    def _on_memory_stream_starting(self, e: ev.MemoryStreamStarting, now: float) -> list[Action]:
        if self.state != S.TRANSFER:
            return []
        self.memory_sent = True  # journaled by the driver's context (``migrate_sent``)
        return []

    def _on_transfer_start_failed(self, e: ev.TransferStartFailed, now: float) -> list[Action]:
        if self.state != S.TRANSFER:
            return []
        return self._rollback(now, f"QEMU refused to migrate: {e.reason}")

    def _on_progress(self, e: ev.Progress, now: float) -> list[Action]:
        acts: list[Action] = []
        if self.state == S.TRANSFER:
            if e.transferred != self._track.last_bytes:
                self._track.last_bytes = e.transferred
                self.timers.set("stall", now + self.plan.stall_timeout_s)
            acts += self._maybe_switch(e, now)
        if self.state in (S.TRANSFER, S.POSTCOPY_SWITCHING, S.POSTCOPY) and (
            now - self._track.last_emit >= self.plan.progress_interval_s
        ):
            self._track.last_emit = now
            acts.append(Emit({"event": "progress", **asdict(e)}))
        return acts

    def _maybe_switch(self, e: ev.Progress, now: float) -> list[Action]:
        if not self.plan.postcopy or e.status != "active":
            return []
        rem = self._track.remaining
        rem.append(e.remaining)
        del rem[:-21]
        not_converging = (
            self.plan.postcopy_if_not_converging
            and e.rounds >= 2
            and len(rem) > 20
            and e.remaining >= min(rem[:-1])
        )
        if e.rounds < self.plan.postcopy_after_rounds and not not_converging:
            return []
        acts = self._enter(S.POSTCOPY_SWITCHING, now, rounds=e.rounds)
        phase = {"event": "phase", "phase": "postcopy", "after_rounds": e.rounds}
        return [*acts, StartPostcopy(), Emit(phase)]

    def _on_switch_refused(self, e: ev.PostcopySwitchRefused, now: float) -> list[Action]:
        if self.state != S.POSTCOPY_SWITCHING:
            return []
        # QEMU did not switch: the migration goes on as pre-copy, the guest is still ours
        self.plan = _replace(self.plan, postcopy=False)
        return self._enter(S.TRANSFER, now, f"post-copy switch refused: {e.reason}")

    def _on_qemu_status(self, e: ev.QemuStatus, now: float) -> list[Action]:
        st = e.status
        if self.state == S.TRANSFER:
            if st == "completed":
                return self._after_completed(now)
            if st in FAILED_QEMU:
                return self._rollback(now, f"QEMU migration {st}")
            if st.startswith("postcopy"):
                return self._postcopy_entered(now, paused=st == "postcopy-paused")
        elif self.state == S.POSTCOPY_SWITCHING:
            if st in ("postcopy-active", "postcopy-recover"):
                return self._postcopy_entered(now, paused=False)
            if st == "postcopy-paused":
                return self._postcopy_entered(now, paused=True)
            if st == "completed":
                return self._after_completed(now)
            if st in FAILED_QEMU:
                return self._rollback(now, f"QEMU migration {st} before the post-copy switch")
        elif self.state in (S.POSTCOPY, S.POSTCOPY_PAUSED):
            if st == "completed":
                return self._handed_over(now, "post-copy completed")
            if st in ("postcopy-paused", "failed") and self.state == S.POSTCOPY:
                return self._pause(now, f"QEMU reports {st}")
        return []

    def _after_completed(self, now: float) -> list[Action]:
        """QEMU sent everything; the guest is paused here. Commit if the peer is reachable."""
        self.timers.cancel("overall", "stall")
        if self.peer_reachable:
            return self._commit(now)
        acts = self._enter(S.AWAITING_PEER, now, "destination agent unreachable")
        if "peer" not in self.timers.deadlines:
            self.timers.set("peer", now + self.plan.peer_grace_s)
        return [*acts, KeepPaused("waiting for the destination agent"), Reconnect()]

    def _on_stream_failed(self, e: ev.StreamFailed, now: float) -> list[Action]:
        reason = f"data channel {e.reason}"
        if self.state == S.HANDSHAKE:
            return self._abandon(now, reason)
        if self.state == S.TRANSFER:
            if e.qemu_status == "completed":
                return self._after_completed(now)
            if e.qemu_status.startswith("postcopy"):
                return self._postcopy_entered(now, paused=True)
            return self._rollback(now, reason)
        if self.state == S.POSTCOPY_SWITCHING:
            if e.qemu_status in ("active", *FAILED_QEMU):
                return self._rollback(now, reason)
            if e.qemu_status == "completed":
                return self._after_completed(now)
            # switched or unknown: the destination may run the guest; keep both halves
            return self._postcopy_entered(now, paused=True)
        if self.state == S.POSTCOPY:
            return self._pause(now, reason)
        return []

    def _on_qemu_exited(self, e: ev.QemuExited, now: float) -> list[Action]:
        self.source_gone = True
        reason = f"source QEMU exited: {e.reason}"
        if self.state in (S.REQUESTED, S.PREPARING, S.HANDSHAKE, S.ROLLING_BACK):
            return self._lost(now, reason)
        if self.state == S.TRANSFER and not self.memory_sent:
            line = f"{reason} before its memory was sent (disks still copying): the VM is lost"
            return self._lost(now, f"{line}; nothing on the destination can run it")
        if self.state == S.TRANSFER:
            # it may have sent everything just before: let the destination say what it holds
            self.timers.cancel("overall", "stall")
            acts = self._enter(S.AWAITING_PEER, now, reason)
            self.timers.set("peer", now + self.plan.peer_grace_s)
            return [*acts, CallPeer("status") if self.peer_reachable else Reconnect()]
        if self.state in (S.POSTCOPY_SWITCHING, S.POSTCOPY, S.POSTCOPY_PAUSED):
            line = (
                f"{reason} while the destination still lacked pages: the VM is lost; the "
                f"destination's half on {self.peer} is kept paused, never killed"
            )
            return self._end(S.FAILED, now, line)
        return []

    def _on_control_lost(self, e: ev.ControlLost, now: float) -> list[Action]:
        self.peer_reachable = False
        if self.state == S.PREPARING:
            return self._abandon(now, f"destination {self.peer} control connection lost")
        if self.state == S.HANDSHAKE:
            return self._abandon(now, f"destination {self.peer} control connection lost")
        if self.state in (S.TRANSFER, S.AWAITING_PEER) and "peer" not in self.timers.deadlines:
            self.timers.set("peer", now + self.plan.peer_grace_s)
        if self.state in TERMINAL or self.state in (S.ROLLING_BACK, S.REQUESTED):
            return []
        self.retry_delay = self.plan.retry_s
        return [Reconnect()]

    def _on_control_restored(self, e: ev.ControlRestored, now: float) -> list[Action]:
        self.peer_reachable = True
        self.retry_delay = self.plan.retry_s
        self.timers.cancel("peer", "retry")
        if self.state == S.POSTCOPY_PAUSED:
            return self._start_recovery(now)
        if self.state in TERMINAL or self.state in (S.REQUESTED, S.ROLLING_BACK):
            return []
        # asking is also what renews the destination's lease on this migration
        return [CallPeer("status")]

    def _on_recovery_done(self, e: ev.RecoveryDone, now: float) -> list[Action]:
        self.recovering = False
        if self.state != S.POSTCOPY_PAUSED:
            return []
        self.recoveries = 0
        return self._enter(S.POSTCOPY, now, "post-copy stream recovered")

    def _on_recovery_failed(self, e: ev.RecoveryFailed, now: float) -> list[Action]:
        self.recovering = False
        if self.state != S.POSTCOPY_PAUSED:
            return []
        self.timers.set("recover", now + min(2.0 * self.recoveries, self.plan.retry_max_s))
        return [Audit("migration.phase", "postcopy-recover-failed", {"reason": e.reason})]

    def _on_commit_answered(self, e: ev.CommitAnswered, now: float) -> list[Action]:
        if self.state not in (S.COMMITTING, S.AWAITING_PEER):
            return []
        return self._handed_over(now, "destination runs the guest")

    def _on_commit_refused(self, e: ev.CommitRefused, now: float) -> list[Action]:
        if self.state != S.COMMITTING:
            return []
        if e.code not in DEFINITIVE_REFUSALS:
            return self._on_commit_lost(ev.CommitLost(f"{e.code}: {e.message}"), now)
        return self._peer_has_no_guest(now, f"destination refused to commit: {e.message}")

    def _peer_has_no_guest(self, now: float, reason: str) -> list[Action]:
        """The destination proved its guest does not run: run ours again, if we still have it."""
        if self.source_gone:
            return self._lost(now, f"{reason}; the source copy is gone too: the VM is lost")
        return self._rollback(now, reason)

    def _on_commit_lost(self, e: ev.CommitLost, now: float) -> list[Action]:
        if self.state != S.COMMITTING:
            return []
        self.peer_reachable = False
        keep = KeepPaused(f"commit answer lost ({e.reason}): in doubt, the guest stays paused")
        return [keep, Audit("migration.phase", "commit-lost", {"reason": e.reason}),
                *self._schedule_retry(now)]  # fmt: skip

    def _on_peer_status(self, e: ev.PeerStatus, now: float) -> list[Action]:
        if self.state == S.TRANSFER and (e.state is None or e.state == "aborted"):
            return self._rollback(now, f"destination reports {e.state or 'no such migration'}")
        if self.state not in (S.COMMITTING, S.AWAITING_PEER):
            return []
        if e.state in PEER_OWNS:
            return self._handed_over(now, f"destination reports {e.state}")
        if e.state in PEER_LOADING:
            return [CallPeer("commit")] if self.state == S.COMMITTING else self._commit(now)
        what = e.state or "no such migration"
        return self._peer_has_no_guest(now, f"destination reports {what}")

    def _on_guest_resumed(self, e: ev.GuestResumed, now: float) -> list[Action]:
        if self.state != S.ROLLING_BACK:
            return []
        if e.running:
            return self._end(S.ROLLED_BACK, now)
        if e.gone:
            self.source_gone = True
        return self._end(S.FAILED, now, f"{self.error}; the source guest did not run: {e.detail}")

    def _on_restarted(self, e: ev.Restarted, now: float) -> list[Action]:
        self.peer_reachable = False
        self.recovering = False
        self.reported = True  # whoever asked is gone with the old agent
        self.memory_sent = self.memory_sent or e.memory_sent
        st = self.state
        if st == S.REQUESTED:
            return self._end(S.ROLLED_BACK, now, "agent restarted before the migration began")
        if st in (S.PREPARING, S.HANDSHAKE):
            return self._abandon(now, "agent restarted before QEMU sent anything")
        if st == S.ROLLING_BACK:
            if not e.qemu_alive:
                return self._end(S.FAILED, now, f"{self.error}; source QEMU gone")
            return [ResumeGuest(), CallPeer("abort", self.error or "rolled back")]
        if not e.qemu_alive and st in (S.TRANSFER, S.POSTCOPY_SWITCHING, S.POSTCOPY,
                                       S.POSTCOPY_PAUSED):  # fmt: skip
            return self._on_qemu_exited(ev.QemuExited("not found after the agent restart"), now)
        if st in (S.AWAITING_PEER, S.COMMITTING):
            self.source_gone = not e.qemu_alive
            self.timers.set("doubt", now + self.plan.doubt_report_s)
            return [KeepPaused("agent restarted while handing over"), Reconnect()]
        return self._restarted_migrating(e, now)

    def _restarted_migrating(self, e: ev.Restarted, now: float) -> list[Action]:
        """Restart while QEMU was (or may still be) sending: follow what QEMU says."""
        st, q = self.state, e.qemu_status
        if q == "completed":
            self.peer_reachable = False
            if st in (S.POSTCOPY, S.POSTCOPY_PAUSED):
                return self._handed_over(now, "post-copy completed while the agent was down")
            return self._after_completed(now)
        if q.startswith("postcopy"):
            paused = q == "postcopy-paused" or not e.relay_alive
            acts = self._postcopy_entered(now, paused=False) if st != S.POSTCOPY_PAUSED else []
            if paused and self.state == S.POSTCOPY:
                acts += self._pause(now, "data path gone while the agent was down")
            elif self.state == S.POSTCOPY_PAUSED:
                acts += self._start_recovery(now)
            return [*acts, Reconnect()]
        if st in (S.POSTCOPY, S.POSTCOPY_PAUSED):
            # the journal says handed over but QEMU says otherwise: never run this copy
            return [KeepPaused(f"journal says {st} but QEMU reports {q}"), Reconnect()]
        if q in ("active", "setup", "device", "pre-switchover") and e.relay_alive:
            acts = (
                self._enter(S.TRANSFER, now, "post-copy switch did not happen")
                if st == S.POSTCOPY_SWITCHING
                else []
            )
            self.timers.set("overall", now + self.plan.timeout_s)
            self.timers.set("stall", now + self.plan.stall_timeout_s)
            self.timers.set("peer", now + self.plan.peer_grace_s)
            return [*acts, Reconnect()]
        return self._rollback(now, f"agent restarted: QEMU migration {q}, data path "
                                   f"{'alive' if e.relay_alive else 'gone'}")  # fmt: skip

    def _on_resolve(self, e: ev.ResolveRequested, now: float) -> list[Action]:
        rid = e.request_id

        def reply(ok: bool, code: str = "", msg: str = "") -> list[Action]:
            return [Reply(rid, ok, code, msg, {"state": self.state.value})] if rid else []

        audit = Audit("migration.resolve", e.keep, {"user": e.user, "state": self.state.value})
        if self.state in (S.COMMITTING, S.AWAITING_PEER):
            if e.keep == "destination":
                return [*self._handed_over(now, f"resolved by {e.user}"), audit, *reply(True)]
            if e.keep == "source":
                acts = self._peer_has_no_guest(now, f"resolved by {e.user}: destination copy gone")
                return [*acts, audit, *reply(True)]
            return [audit, Reconnect(), *reply(True)]
        if self.state == S.POSTCOPY_PAUSED:
            if e.keep != "retry":
                msg = (
                    "after the post-copy switch neither half is a whole VM: only 'retry' "
                    "(recover the stream) is possible"
                )
                return reply(False, "invalid", msg)
            self.recoveries = 0
            return [audit, *self._start_recovery(now), *reply(True)]
        line = f"migration {self.migration_id} is {self.state}, not in doubt"
        return reply(False, "invalid", line)

    # ------------------------------------------------------------------ timers
    def _on_timer(self, name: str, now: float) -> list[Action]:
        st = self.state
        if name == "overall" and st == S.TRANSFER:
            return self._rollback(now, f"migration timed out after {self.plan.timeout_s:.0f}s")
        if name == "stall" and st == S.TRANSFER:
            return self._rollback(
                now, f"migration stalled: no progress for {self.plan.stall_timeout_s:.0f}s"
            )
        if name == "peer" and st in (S.TRANSFER, S.AWAITING_PEER) and not self.peer_reachable:
            line = f"destination agent {self.peer} unreachable for {self.plan.peer_grace_s:.0f}s"
            if self.source_gone:
                return self._lost(now, f"{line}; the source QEMU is gone")
            return self._rollback(now, line)
        if name == "retry" and st not in TERMINAL and st != S.ROLLING_BACK:
            if not self.peer_reachable:
                return [Reconnect()]
            return [CallPeer("status")] if st in (S.COMMITTING, S.AWAITING_PEER) else []
        if name == "doubt" and st in (S.COMMITTING, S.AWAITING_PEER):
            line = (
                f"destination {self.peer} did not confirm its guest runs; the source guest "
                "stays paused to avoid two running copies (in doubt): 'trustmig migration "
                f"show {self.migration_id}', then 'trustmig migration resolve'"
            )
            return self._finish("in-doubt", line)
        if name == "recover" and st == S.POSTCOPY_PAUSED:
            if self.recoveries >= self.plan.max_recoveries:
                self.recoveries = self.plan.max_recoveries - 1  # keep trying, slowly
            return self._start_recovery(now)
        return []

    # ------------------------------------------------------------------ journal
    def _extra_record(self) -> dict[str, Any]:
        return {
            "plan": asdict(self.plan),
            "source_gone": self.source_gone,
            "recoveries": self.recoveries,
            "postcopy_switched": self.postcopy_switched,
            "memory_sent": self.memory_sent,
            "evidence": self.evidence,
        }

    @classmethod
    def restore(cls, record: dict[str, Any]) -> SourceCore:
        """Rebuild a core from its journal record (then feed it :class:`Restarted`)."""
        extra = record.get("extra") or {}
        core = cls(
            record["migration_id"],
            record["vm"],
            record["peer"],
            int(record["epoch"]),
            SourcePlan(**extra.get("plan", {})),
            SourceState(record["state"]),
        )
        core.error = record.get("error")
        core.source_gone = bool(extra.get("source_gone"))
        core.recoveries = int(extra.get("recoveries", 0))
        core.postcopy_switched = bool(extra.get("postcopy_switched"))
        core.memory_sent = bool(extra.get("memory_sent"))
        core.evidence = str(extra.get("evidence", ""))
        return core


def _replace(plan: SourcePlan, **changes: Any) -> SourcePlan:
    return SourcePlan(**{**asdict(plan), **changes})


__all__ = [
    "GUEST_MAY_BE_KILLED",
    "GUEST_MAY_RESUME",
    "HANDED_OVER",
    "HOLDS_RESOURCES",
    "IN_DOUBT",
    "TERMINAL",
    "TRANSITIONS",
    "SourceCore",
    "SourcePlan",
    "SourceState",
]
