"""The destination side of a migration: a paused incoming guest that runs only when it may.

The incoming QEMU always starts paused (``-S``). It runs when (a) the source commits a
pre-copy whose stream QEMU loaded completely, or (b) QEMU reports ``postcopy-active``: the
source switched to post-copy, which it journaled as the handover before telling its QEMU. Before
either, the incoming guest may be discarded (the source still owns the VM); after, nothing the
migration does kills it: a broken post-copy stream is recovered, never given up by killing.

Safety rules, each a unit test by name:
- the destination guest runs only after a commit or the post-copy switch;
- after the post-copy switch nothing kills the destination guest;
- a refusal is only answered when it is true (an aborted guest can never be committed later).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from trustmig.migration import events as ev
from trustmig.migration.actions import (
    Action,
    AdoptGuest,
    ArmRecover,
    KillIncoming,
    ReleaseAdmission,
    Reply,
    ResumeGuest,
)
from trustmig.migration.core import MigrationCore


class DestinationState(StrEnum):
    PREPARED = "prepared"
    RECEIVING = "receiving"
    LOADED = "loaded"
    POSTCOPY = "postcopy"
    POSTCOPY_PAUSED = "postcopy-paused"
    RECOVERING = "recovering"
    COMMITTED = "committed"
    ABORTED = "aborted"


D = DestinationState

TERMINAL = frozenset({D.COMMITTED, D.ABORTED})
HOLDS_RESOURCES = frozenset(set(D) - TERMINAL)
#: Before the handover: the incoming guest may be discarded.
GUEST_MAY_BE_KILLED = frozenset({D.PREPARED, D.RECEIVING, D.LOADED})
#: The guest may run here (or runs): this host owns the VM.
OWNER = frozenset({D.POSTCOPY, D.POSTCOPY_PAUSED, D.RECOVERING, D.COMMITTED})
#: The post-copy stream is broken: the guest is kept, waiting for the source to recover it.
IN_DOUBT = frozenset({D.POSTCOPY_PAUSED, D.RECOVERING})

TRANSITIONS: Mapping[DestinationState, frozenset[DestinationState]] = {
    # QEMU's word that the switch happened always wins over a journal that lags behind it
    D.PREPARED: frozenset({D.RECEIVING, D.POSTCOPY, D.POSTCOPY_PAUSED, D.ABORTED}),
    D.RECEIVING: frozenset({D.LOADED, D.POSTCOPY, D.POSTCOPY_PAUSED, D.COMMITTED, D.ABORTED}),
    D.LOADED: frozenset({D.COMMITTED, D.POSTCOPY, D.POSTCOPY_PAUSED, D.ABORTED}),
    D.POSTCOPY: frozenset({D.POSTCOPY_PAUSED, D.COMMITTED, D.ABORTED}),
    D.POSTCOPY_PAUSED: frozenset({D.RECOVERING, D.POSTCOPY, D.COMMITTED, D.ABORTED}),
    D.RECOVERING: frozenset({D.POSTCOPY, D.POSTCOPY_PAUSED, D.COMMITTED, D.ABORTED}),
    # a commit whose guest then failed to start never ran anywhere: it may still be aborted
    D.COMMITTED: frozenset({D.ABORTED}),
    D.ABORTED: frozenset(),
}


@dataclass(frozen=True)
class DestinationPlan:
    postcopy: bool = False
    #: The source agent may be gone this long before an unfinished pre-copy is discarded.
    orphan_timeout_s: float = 300.0
    #: After the source's commit, the stream must be fully loaded within this time.
    load_timeout_s: float = 60.0
    #: The source must open its data session within this time after the prepare.
    prepare_timeout_s: float = 120.0


class DestinationCore(MigrationCore[DestinationState]):
    """Sans-IO destination migration."""

    role = "destination"
    TRANSITIONS = TRANSITIONS
    TERMINAL = TERMINAL

    def __init__(
        self,
        migration_id: str,
        vm: str,
        source: str,
        epoch: int,
        plan: DestinationPlan | None = None,
        state: DestinationState = D.PREPARED,
        now: float | None = None,
    ) -> None:
        super().__init__(migration_id, vm, source, state, epoch)
        self.plan = plan or DestinationPlan()
        self.pending_commit: int | None = None
        self.resumed = False
        #: QEMU reported the post-copy switch: the guest may have run here since.
        self.switched = state in (D.POSTCOPY, D.POSTCOPY_PAUSED, D.RECOVERING)
        if now is not None and state == D.PREPARED:
            self.timers.set("prepare", now + self.plan.prepare_timeout_s)

    @property
    def owner_epoch(self) -> int:
        """The VM's epoch once this host owns it (one more than the source's)."""
        return self.epoch + 1

    # ------------------------------------------------------------------ helpers
    def may_claim_session(self) -> bool:
        """Whether an authenticated data session for this migration may be accepted now."""
        return self.state in (D.PREPARED, D.RECOVERING)

    def _abort(
        self, now: float, reason: str, rid: int | None = None, *, kill: bool = True
    ) -> list[Action]:
        """Discard the incoming guest; callers guarantee it never ran (or is already gone)."""
        if self.error is None:
            self.error = reason
        acts = self._enter(D.ABORTED, now, reason)
        acts += [KillIncoming(reason)] if kill else []
        acts.append(ReleaseAdmission())
        acts += self._answer_pending(False, "aborted", reason)
        if rid is not None:
            acts.append(Reply(rid, True, result={"state": self.state.value}))
        return acts

    def _answer_pending(self, ok: bool, code: str = "", message: str = "") -> list[Action]:
        rid, self.pending_commit = self.pending_commit, None
        if rid is None:
            return []
        return [Reply(rid, ok, code, message, self._status())]

    def _status(self) -> dict[str, Any]:
        return {"state": self.state.value, "epoch": self.owner_epoch if self.owns else 0}

    @property
    def owns(self) -> bool:
        return self.state in OWNER

    def _commit(self, now: float, rid: int | None) -> list[Action]:
        """Journal ownership first, then run the guest; the reply waits for QEMU."""
        if rid is not None:
            self.pending_commit = rid
        self.timers.cancel("load", "orphan", "prepare")
        acts = self._enter(D.COMMITTED, now, epoch=self.owner_epoch)
        return [*acts, ResumeGuest(self.pending_commit)]

    def _switched(self, now: float, paused: bool = False) -> list[Action]:
        """QEMU reports the post-copy switch: the guest is ours and must run here."""
        self.timers.cancel("load", "orphan", "prepare")
        self.switched = True
        target = D.POSTCOPY_PAUSED if paused else D.POSTCOPY
        acts = self._enter(target, now, epoch=self.owner_epoch)
        return [*acts, ResumeGuest()]

    def _refuse_kill(self, rid: int) -> list[Action]:
        msg = (
            f"the guest runs on this host since the post-copy switch ({self.state}): it is "
            "kept, never discarded; recover the stream instead"
        )
        return [Reply(rid, False, "in_doubt", msg, self._status())]

    # ------------------------------------------------------------------ handlers
    def handlers(self) -> Mapping[type[ev.Event], Callable[[Any, float], list[Action]]]:
        return {
            ev.SessionClaimed: self._on_session,
            ev.QemuStatus: self._on_qemu_status,
            ev.StreamFailed: self._on_stream_failed,
            ev.QemuExited: self._on_qemu_exited,
            ev.ControlLost: self._on_control_lost,
            ev.ControlRestored: self._on_control_restored,
            ev.CommitRequested: self._on_commit,
            ev.AbortRequested: self._on_abort,
            ev.RecoverRequested: self._on_recover,
            ev.RecoverArmed: self._on_armed,
            ev.RecoverArmFailed: self._on_arm_failed,
            ev.GuestResumed: self._on_resumed,
            ev.Restarted: self._on_restarted,
        }

    def _terminal_accepts(self, event: ev.Event) -> bool:
        if isinstance(event, ev.GuestResumed | ev.CommitRequested | ev.AbortRequested):
            return True
        if isinstance(event, ev.RecoverRequested):
            return True
        return isinstance(event, ev.Restarted) and self.state == D.COMMITTED

    def _on_session(self, e: ev.SessionClaimed, now: float) -> list[Action]:
        if self.state == D.PREPARED:
            self.timers.cancel("prepare")
            return self._enter(D.RECEIVING, now)
        if self.state == D.RECOVERING:
            return self._enter(D.POSTCOPY, now, "post-copy stream recovered")
        return []

    def _on_qemu_status(self, e: ev.QemuStatus, now: float) -> list[Action]:
        st = e.status
        if self.state == D.RECEIVING:
            if st == "completed":
                acts = self._enter(D.LOADED, now)
                if self.pending_commit is not None:
                    acts += self._commit(now, None)
                return acts
            if st == "postcopy-active":
                return self._switched(now)
            if st == "postcopy-paused":
                return self._switched(now, paused=True)
            if st in ("failed", "cancelled"):
                return self._abort(now, f"incoming QEMU migration {st}")
        elif self.state in (D.POSTCOPY, D.POSTCOPY_PAUSED, D.RECOVERING):
            if st == "completed":
                acts = self._enter(D.COMMITTED, now, "post-copy completed", epoch=self.owner_epoch)
                return [*acts, ResumeGuest(self.pending_commit)]
            if st == "postcopy-paused" and self.state == D.POSTCOPY:
                return self._enter(D.POSTCOPY_PAUSED, now, "QEMU paused the post-copy stream")
            if st == "postcopy-active" and self.state != D.POSTCOPY:
                return self._enter(D.POSTCOPY, now, "post-copy stream running again")
        return []

    def _on_stream_failed(self, e: ev.StreamFailed, now: float) -> list[Action]:
        reason = f"data channel {e.reason}"
        if self.state == D.RECEIVING:
            q = e.qemu_status
            if q == "completed":
                return self._enter(D.LOADED, now, reason)
            if q.startswith("postcopy") or (q == "unknown" and self.plan.postcopy):
                # the switch may have happened: the guest may exist only here now
                return self._switched(now, paused=True)
            return self._abort(now, reason)
        if self.state in (D.POSTCOPY, D.RECOVERING):
            return self._enter(D.POSTCOPY_PAUSED, now, reason)
        return []

    def _on_qemu_exited(self, e: ev.QemuExited, now: float) -> list[Action]:
        if self.state in TERMINAL:
            return []
        what = "the VM is lost" if self.switched else "nothing ran here"
        return self._abort(now, f"incoming QEMU exited ({e.reason}): {what}", kill=False)

    def _on_control_lost(self, e: ev.ControlLost, now: float) -> list[Action]:
        if self.state in GUEST_MAY_BE_KILLED:
            self.timers.set("orphan", now + self.plan.orphan_timeout_s)
        return []

    def _on_control_restored(self, e: ev.ControlRestored, now: float) -> list[Action]:
        self.timers.cancel("orphan")
        return []

    def _on_commit(self, e: ev.CommitRequested, now: float) -> list[Action]:
        self.timers.cancel("orphan")
        st = self.state
        if st == D.LOADED:
            return self._commit(now, e.request_id)
        if st == D.RECEIVING:
            # a repeated commit (the source lost our silence) replaces the earlier request,
            # which is told so; the load deadline counts from the first one
            superseded = self.pending_commit
            self.pending_commit = e.request_id
            if "load" not in self.timers.deadlines:
                self.timers.set("load", now + self.plan.load_timeout_s)
            if superseded is None:
                return []
            msg = "superseded by a newer commit request"
            return [Reply(superseded, False, "in_doubt", msg, self._status())]
        if st in (D.POSTCOPY, D.POSTCOPY_PAUSED, D.RECOVERING):
            return [Reply(e.request_id, True, result=self._status())]
        if st == D.COMMITTED:
            if self.resumed:
                return [Reply(e.request_id, True, result=self._status())]
            self.pending_commit = e.request_id
            return [ResumeGuest(e.request_id)]
        if st == D.PREPARED:
            refusal = Reply(e.request_id, False, "aborted", "no migration stream was received")
            return [*self._abort(now, "commit before any data arrived"), refusal]
        return [Reply(e.request_id, False, "aborted", f"incoming migration aborted: {self.error}")]

    def _on_abort(self, e: ev.AbortRequested, now: float) -> list[Action]:
        if self.state in GUEST_MAY_BE_KILLED:
            return self._abort(now, e.reason or "source aborted", e.request_id)
        if self.state == D.ABORTED:
            return [Reply(e.request_id, True, result=self._status())]
        if self.state == D.COMMITTED:
            return [Reply(e.request_id, False, "committed", "the guest already runs here")]
        return self._refuse_kill(e.request_id)

    def _on_recover(self, e: ev.RecoverRequested, now: float) -> list[Action]:
        if self.state == D.RECOVERING:
            return [Reply(e.request_id, True, result=self._status())]
        if self.state == D.RECEIVING and self.plan.postcopy:
            # the source saw the stream break first: it is an authenticated peer, believe it
            return [*self._switched(now, paused=True), ArmRecover(e.request_id)]
        if self.state in (D.POSTCOPY_PAUSED, D.POSTCOPY):
            acts = self._enter(D.POSTCOPY_PAUSED, now, "source reports the stream broken")
            return [*acts, ArmRecover(e.request_id)]
        msg = (
            f"migration {self.migration_id} is {self.state}; only a post-copy migration whose "
            "stream broke can be recovered"
        )
        return [Reply(e.request_id, False, "invalid", msg)]

    def _on_armed(self, e: ev.RecoverArmed, now: float) -> list[Action]:
        if self.state != D.POSTCOPY_PAUSED:
            return [Reply(e.request_id, True, result=self._status())]
        acts = self._enter(D.RECOVERING, now)
        return [*acts, Reply(e.request_id, True, result=self._status())]

    def _on_arm_failed(self, e: ev.RecoverArmFailed, now: float) -> list[Action]:
        msg = f"destination QEMU refused migrate-recover: {e.reason}"
        return [Reply(e.request_id, False, "failed", msg)]

    def _on_resumed(self, e: ev.GuestResumed, now: float) -> list[Action]:
        if self.state == D.COMMITTED:
            if e.running:
                self.resumed = True
                acts: list[Action] = [
                    AdoptGuest(self.owner_epoch),
                    ReleaseAdmission(completed=True),
                ]
                return acts + self._answer_pending(True)
            if self.switched:
                # after the post-copy switch this is the only copy: keep it, whatever QEMU says
                return self._answer_pending(False, "in_doubt", f"guest not running: {e.detail}")
            # the guest never ran anywhere since the commit: discarding it loses nothing
            return self._abort(now, f"destination guest did not start: {e.detail}")
        return []

    def _on_restarted(self, e: ev.Restarted, now: float) -> list[Action]:
        st, q = self.state, e.qemu_status
        if not e.qemu_alive:
            if st in TERMINAL:
                return []
            return self._abort(now, "incoming QEMU gone while the agent was down", kill=False)
        if st == D.COMMITTED:
            return [ResumeGuest()]
        if q == "completed":
            if st in (D.POSTCOPY, D.POSTCOPY_PAUSED, D.RECOVERING):
                acts = self._enter(D.COMMITTED, now, "post-copy completed while the agent was down",
                                   epoch=self.owner_epoch)  # fmt: skip
                return [*acts, ResumeGuest()]
            acts = self._enter(D.LOADED, now) if st == D.RECEIVING else []
            if st in (D.RECEIVING, D.LOADED):
                self.timers.set("orphan", now + self.plan.orphan_timeout_s)
                return acts
        if q.startswith("postcopy") or (q == "unknown" and st in OWNER):
            paused = q == "postcopy-paused" or not e.relay_alive
            if st in (D.PREPARED, D.RECEIVING, D.LOADED):
                return self._switched(now, paused=paused)
            self.switched = True
            target = D.POSTCOPY_PAUSED if paused else D.POSTCOPY
            return [*self._enter(target, now, "agent restarted"), ResumeGuest()]
        if st in OWNER:
            # the journal says the guest may run here: whatever QEMU says, never discard it
            return []
        if st == D.PREPARED:
            return self._abort(now, "agent restarted before the source opened its session")
        if st in (D.RECEIVING, D.LOADED) and e.relay_alive and q in ("active", "setup", "device"):
            self.timers.set("orphan", now + self.plan.orphan_timeout_s)
            return []
        if st == D.LOADED:
            self.timers.set("orphan", now + self.plan.orphan_timeout_s)
            return []
        if q == "unknown" and self.plan.postcopy:
            return self._switched(now, paused=True)
        return self._abort(now, f"agent restarted: incoming QEMU {q}, data path "
                                f"{'alive' if e.relay_alive else 'gone'}")  # fmt: skip

    # ------------------------------------------------------------------ timers
    def _on_timer(self, name: str, now: float) -> list[Action]:
        if name == "prepare" and self.state == D.PREPARED:
            return self._abort(now, f"no data session within {self.plan.prepare_timeout_s:.0f}s")
        if name == "orphan" and self.state in GUEST_MAY_BE_KILLED:
            return self._abort(
                now, f"source agent gone for {self.plan.orphan_timeout_s:.0f}s before the handover"
            )
        if name == "load" and self.state == D.RECEIVING and self.pending_commit is not None:
            return self._abort(now, f"stream not loaded {self.plan.load_timeout_s:.0f}s after the "
                                    "source completed")  # fmt: skip
        return []

    # ------------------------------------------------------------------ journal
    def _extra_record(self) -> dict[str, Any]:
        return {"plan": asdict(self.plan), "resumed": self.resumed, "switched": self.switched}

    @classmethod
    def restore(cls, record: dict[str, Any]) -> DestinationCore:
        extra = record.get("extra") or {}
        core = cls(
            record["migration_id"],
            record["vm"],
            record["peer"],
            int(record["epoch"]),
            DestinationPlan(**extra.get("plan", {})),
            DestinationState(record["state"]),
        )
        core.error = record.get("error")
        core.resumed = bool(extra.get("resumed"))
        core.switched = bool(extra.get("switched", core.switched))
        return core


__all__ = [
    "GUEST_MAY_BE_KILLED",
    "HOLDS_RESOURCES",
    "IN_DOUBT",
    "OWNER",
    "TERMINAL",
    "TRANSITIONS",
    "DestinationCore",
    "DestinationPlan",
    "DestinationState",
]
