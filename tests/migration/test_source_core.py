"""The source core: its walks, its timers, its journal record and its safety rules by name."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmig.migration import actions as A
from trustmig.migration import events as ev
from trustmig.migration.source import (
    HANDED_OVER,
    IN_DOUBT,
    SourceCore,
    SourcePlan,
    SourceState,
)

from .samples import SAMPLES

S = SourceState


def kinds(acts: list[A.Action]) -> list[str]:
    return [type(a).__name__ for a in acts if not isinstance(a, A.Persist | A.Audit | A.Emit)]


def walk_to_transfer(plan: SourcePlan | None = None, *, memory_sent: bool = True) -> SourceCore:
    core = SourceCore("m-1", "vm1", "host-b", 3, plan or SourcePlan())
    core.handle(ev.Decided(True, "allow", "ok"), 0.0)
    core.handle(ev.Prepared("127.0.0.1:9", "ok"), 0.1)
    core.handle(ev.Attested("verified", 2.0), 0.2)
    acts = core.handle(ev.ClaimJudged(True, False, "claim.ok", "fits"), 0.3)
    assert kinds(acts) == ["StartTransfer"]
    assert core.state == S.TRANSFER
    if memory_sent:
        assert kinds(core.handle(ev.MemoryStreamStarting(), 0.35)) == []
    return core


def test_precopy_walk_hands_over_only_on_the_destinations_answer() -> None:
    core = walk_to_transfer()
    core.handle(ev.Progress("active", 10, 100, 200, 1), 1.0)
    acts = core.handle(ev.QemuStatus("completed"), 2.0)
    assert core.state == S.COMMITTING
    assert kinds(acts) == ["KeepPaused", "CallPeer"]
    acts = core.handle(ev.CommitAnswered(99, 4), 2.1)
    assert core.state == S.COMPLETED
    assert kinds(acts) == ["Conclude", "ReleaseAdmission", "Finish"]
    finish = next(a for a in acts if isinstance(a, A.Finish))
    assert finish.outcome == "completed" and finish.error is None
    assert core.handover_epoch == 4
    assert [s for _, s in core.history] == [
        "preparing", "handshake", "transfer", "committing", "completed",
    ]  # fmt: skip


def test_postcopy_switch_is_journaled_before_qemu_is_told() -> None:
    core = walk_to_transfer(SourcePlan(postcopy=True, postcopy_after_rounds=2))
    assert kinds(core.handle(ev.Progress("active", 10, 100, 200, 1), 1.0)) == []
    acts = core.handle(ev.Progress("active", 50, 60, 200, 2), 1.5)
    assert core.state == S.POSTCOPY_SWITCHING
    assert isinstance(acts[0], A.Persist)
    assert acts.index(next(a for a in acts if isinstance(a, A.StartPostcopy))) > 0
    core.handle(ev.QemuStatus("postcopy-active"), 1.6)
    assert core.state == S.POSTCOPY
    acts = core.handle(ev.QemuStatus("completed"), 3.0)
    assert core.state == S.COMPLETED and "Conclude" in kinds(acts)


def test_postcopy_switch_refused_goes_on_as_precopy() -> None:
    core = walk_to_transfer(SourcePlan(postcopy=True, postcopy_after_rounds=1))
    core.handle(ev.Progress("active", 10, 100, 200, 1), 1.0)
    core.handle(ev.PostcopySwitchRefused("not possible"), 1.1)
    assert core.state == S.TRANSFER
    assert kinds(core.handle(ev.Progress("active", 20, 90, 200, 5), 1.2)) == []


def test_not_converging_precopy_switches_to_postcopy() -> None:
    core = walk_to_transfer(SourcePlan(postcopy=True, postcopy_after_rounds=50))
    for i in range(25):
        core.handle(ev.Progress("active", 10 * i, 1000, 2000, 3), 1.0 + i)
    assert core.state == S.POSTCOPY_SWITCHING


def test_denied_request_is_refused_without_touching_anyone() -> None:
    core = SourceCore("m-1", "vm1", "host-b", 1)
    acts = core.handle(ev.Decided(False, "default-deny", "no policy for vm1"), 0.0)
    assert core.state == S.REFUSED
    assert kinds(acts) == ["ReleaseAdmission", "Finish"]
    assert core.error == "no policy for vm1"


def test_lying_destination_is_quarantined_and_nothing_sent() -> None:
    core = SourceCore("m-1", "vm1", "host-b", 1)
    core.handle(ev.Decided(True, "allow", "ok"), 0.0)
    core.handle(ev.Prepared("a:1", "ok"), 0.1)
    acts = core.handle(ev.ClaimJudged(False, True, "claim.exceeds", "8x"), 0.2)
    assert core.state == S.ROLLED_BACK
    assert "Quarantine" in kinds(acts) and "StartTransfer" not in kinds(acts)


def test_stall_timer_rolls_back_and_resumes_the_guest() -> None:
    core = walk_to_transfer(SourcePlan(stall_timeout_s=5))
    core.handle(ev.Progress("active", 10, 100, 200, 1), 1.0)
    assert core.get_timer() == pytest.approx(6.0)
    assert core.handle_timer(5.9) == []
    acts = core.handle_timer(6.0)
    assert core.state == S.ROLLING_BACK
    assert kinds(acts) == ["CancelTransfer", "ResumeGuest", "CallPeer"]
    acts = core.handle(ev.GuestResumed(True), 6.5)
    assert core.state == S.ROLLED_BACK
    assert "stalled" in (core.error or "")


def test_progress_keeps_the_stall_timer_away() -> None:
    core = walk_to_transfer(SourcePlan(stall_timeout_s=5))
    for t in range(1, 30):
        core.handle(ev.Progress("active", t * 10, 100, 200, 1), float(t))
        core.handle_timer(float(t))
    assert core.state == S.TRANSFER


def test_unreachable_destination_agent_is_waited_for_then_rolled_back() -> None:
    core = walk_to_transfer(SourcePlan(peer_grace_s=20, stall_timeout_s=100))
    acts = core.handle(ev.ControlLost("reset"), 1.0)
    assert kinds(acts) == ["Reconnect"]
    core.handle(ev.PeerUnreachable("refused"), 1.1)
    assert core.state == S.TRANSFER
    acts = core.handle(ev.QemuStatus("completed"), 5.0)
    assert core.state == S.AWAITING_PEER
    assert "CallPeer" not in kinds(acts), "no commit while the destination cannot be reached"
    acts = core.handle_timer(21.0)
    assert core.state == S.ROLLING_BACK and "ResumeGuest" in kinds(acts)


def test_destination_agent_back_in_time_completes_the_migration() -> None:
    core = walk_to_transfer(SourcePlan(peer_grace_s=20))
    core.handle(ev.ControlLost("reset"), 1.0)
    core.handle(ev.QemuStatus("completed"), 2.0)
    acts = core.handle(ev.ControlRestored(), 8.0)
    assert kinds(acts) == ["CallPeer"]
    acts = core.handle(ev.PeerStatus("loaded"), 8.1)
    assert core.state == S.COMMITTING
    core.handle(ev.CommitAnswered(7, 2), 8.2)
    assert core.state == S.COMPLETED
    assert core.handle_timer(100.0) == []


# ---------------------------------------------------------------------- safety rules by name
IN_DOUBT_NOISE = [
    ev.CommitLost("timeout"),
    ev.CommitRefused("in_doubt", "?"),
    ev.CommitRefused("transport", "reset"),
    ev.ControlLost("reset"),
    ev.PeerUnreachable("refused"),
    ev.ControlRestored(),
    ev.StreamFailed("stream 0: reset", "completed"),
    ev.QemuStatus("completed"),
    ev.QemuExited("killed"),
    ev.Restarted(True, "completed", False),
    ev.Restarted(False, "unknown", False),
    ev.ResolveRequested("retry", "sam", 1),
]


def test_lost_commit_answer_never_resumes_the_source() -> None:
    core = walk_to_transfer(SourcePlan(doubt_report_s=30))
    core.handle(ev.QemuStatus("completed"), 1.0)
    assert core.state == S.COMMITTING
    seen: list[A.Action] = []
    t = 2.0
    for _ in range(20):
        for e in IN_DOUBT_NOISE:
            t += 1.0
            seen += core.handle(e, t)
            seen += core.handle_timer(t)
    assert core.state == S.COMMITTING
    assert not any(isinstance(a, A.ResumeGuest | A.CancelTransfer | A.Conclude) for a in seen)
    doubt = [a for a in seen if isinstance(a, A.Finish)]
    assert len(doubt) <= 1 and all(a.outcome == "in-doubt" for a in doubt)
    # only the destination's definitive word settles it
    core.handle(ev.PeerStatus("committed", 2), t + 1)
    assert core.state == S.COMPLETED


def test_definitive_refusal_after_a_lost_answer_resumes_the_source() -> None:
    core = walk_to_transfer()
    core.handle(ev.QemuStatus("completed"), 1.0)
    core.handle(ev.CommitLost("timeout"), 2.0)
    core.handle(ev.ControlRestored(), 3.0)
    acts = core.handle(ev.PeerStatus("aborted"), 3.1)
    assert core.state == S.ROLLING_BACK and "ResumeGuest" in kinds(acts)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_nothing_kills_either_guest_after_the_postcopy_switch(name: str) -> None:
    for state in (S.POSTCOPY, S.POSTCOPY_PAUSED):
        core = SourceCore("m", "vm", "host-b", 1, SourcePlan(postcopy=True), state=state)
        acts = core.handle(SAMPLES[name], 1.0) + core.handle_timer(1e9)
        forbidden = (A.CancelTransfer, A.ResumeGuest, A.KillIncoming)
        assert not any(isinstance(a, forbidden) for a in acts), (state, name, acts)
        assert not any(isinstance(a, A.CallPeer) and a.op == "abort" for a in acts)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(sorted(SAMPLES)), min_size=1, max_size=40))
def test_source_that_handed_over_never_runs_its_guest_again(names: list[str]) -> None:
    for start in (S.POSTCOPY, S.COMPLETED, S.POSTCOPY_PAUSED):
        core = SourceCore("m", "vm", "host-b", 1, SourcePlan(postcopy=True), state=start)
        t = 0.0
        for name in names:
            t += 7.0
            acts = core.handle(SAMPLES[name], t) + core.handle_timer(t)
            assert not any(isinstance(a, A.ResumeGuest) for a in acts), (start, names)
            assert core.state in HANDED_OVER or core.state == S.FAILED


def _definitive(e: ev.Event) -> bool:
    if isinstance(e, ev.CommitRefused):
        return e.code in ("aborted", "not_found", "refused")
    if isinstance(e, ev.PeerStatus):
        return e.state not in ("committed", "postcopy", "postcopy-paused", "recovering",
                               "receiving", "loaded")  # fmt: skip
    return isinstance(e, ev.ResolveRequested) and e.keep == "source"


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(sorted(SAMPLES)), min_size=1, max_size=60))
def test_random_walks_keep_the_source_rules(names: list[str]) -> None:
    """From the request on, whatever happens: a resume only while rolling back, never after a
    commit went out unless the destination said no, never after the handover."""
    core = SourceCore("m", "vm", "host-b", 1, SourcePlan(postcopy=True, postcopy_after_rounds=1))
    committed_once = handed_over = False
    t = 0.0
    for name in names:
        e = SAMPLES[name]
        t += 3.0
        acts = core.handle(e, t) + core.handle_timer(t)
        if any(isinstance(a, A.ResumeGuest) for a in acts):
            assert core.state == S.ROLLING_BACK
            assert not handed_over
            assert not committed_once or _definitive(e), (names, name)
        if any(isinstance(a, A.Conclude) for a in acts):
            assert core.state == S.COMPLETED
        if any(isinstance(a, A.CallPeer) and a.op == "commit" for a in acts):
            committed_once = True
        handed_over = handed_over or core.state in HANDED_OVER
        finishes = [a for a in acts if isinstance(a, A.Finish)]
        assert len(finishes) <= 1


def test_in_doubt_states_are_named() -> None:
    assert {S.COMMITTING, S.POSTCOPY_SWITCHING, S.POSTCOPY_PAUSED} == IN_DOUBT


def test_source_qemu_gone_while_disks_copy_is_lost_at_once_and_the_destination_told() -> None:
    core = walk_to_transfer(memory_sent=False)
    acts = core.handle(ev.QemuExited("killed"), 1.0)
    assert core.state == S.FAILED and core.source_gone
    assert kinds(acts) == ["ReleaseAdmission", "Finish", "CallPeer"]
    call = next(a for a in acts if isinstance(a, A.CallPeer))
    assert call.op == "abort" and "before its memory was sent" in (core.error or "")


def test_source_qemu_gone_after_the_memory_began_asks_the_destination_first() -> None:
    core = walk_to_transfer()
    acts = core.handle(ev.QemuExited("killed"), 1.0)
    assert core.state == S.AWAITING_PEER and kinds(acts) == ["CallPeer"]


@pytest.mark.parametrize("sent, state", [(False, S.FAILED), (True, S.AWAITING_PEER)])
def test_restart_with_qemu_gone_follows_the_journaled_memory_start(
    sent: bool, state: SourceState
) -> None:
    core = SourceCore.restore(walk_to_transfer(memory_sent=False).record())
    core.handle(ev.Restarted(False, "unknown", False, memory_sent=sent), 5.0)
    assert core.state == state


# ---------------------------------------------------------------------- restart and resolve
def test_record_round_trips_through_the_journal() -> None:
    core = walk_to_transfer(SourcePlan(postcopy=True, peer_grace_s=33))
    core.handle(ev.QemuExited("x"), 1.0)
    back = SourceCore.restore(core.record())
    assert back.record() == core.record()
    assert back.plan.peer_grace_s == 33 and back.source_gone


def test_restart_in_transfer_with_live_data_path_goes_on() -> None:
    core = SourceCore.restore(walk_to_transfer().record())
    acts = core.handle(ev.Restarted(True, "active", True), 50.0)
    assert core.state == S.TRANSFER and kinds(acts) == ["Reconnect"]
    core.handle(ev.ControlRestored(), 51.0)
    core.handle(ev.QemuStatus("completed"), 52.0)
    assert core.state == S.COMMITTING


def test_restart_after_commit_asks_the_destination_before_anything() -> None:
    core = walk_to_transfer()
    core.handle(ev.QemuStatus("completed"), 1.0)
    core = SourceCore.restore(core.record())
    acts = core.handle(ev.Restarted(True, "completed", False), 10.0)
    assert kinds(acts) == ["KeepPaused", "Reconnect"]
    assert kinds(core.handle(ev.ControlRestored(), 11.0)) == ["CallPeer"]
    core.handle(ev.PeerStatus("committed", 2), 11.1)
    assert core.state == S.COMPLETED


def test_operator_resolves_an_in_doubt_commit() -> None:
    core = walk_to_transfer()
    core.handle(ev.QemuStatus("completed"), 1.0)
    core.handle(ev.CommitLost("timeout"), 2.0)
    acts = core.handle(ev.ResolveRequested("destination", "sam", 5), 3.0)
    assert core.state == S.COMPLETED
    assert any(isinstance(a, A.Audit) and a.kind == "migration.resolve" for a in acts)
    reply = next(a for a in acts if isinstance(a, A.Reply))
    assert reply.ok and reply.request_id == 5


def test_resolve_is_refused_where_nothing_is_in_doubt() -> None:
    core = walk_to_transfer()
    acts = core.handle(ev.ResolveRequested("source", "sam", 5), 3.0)
    reply = next(a for a in acts if isinstance(a, A.Reply))
    assert not reply.ok and reply.code == "invalid" and core.state == S.TRANSFER


def test_a_guest_whose_qemu_died_is_not_left_paused() -> None:
    """A roll-back that finds the source QEMU gone fails the migration with the guest counted
    as gone (its VM is reported crashed, never paused and waiting)."""
    core = walk_to_transfer(SourcePlan(stall_timeout_s=5))
    core.handle_timer(6.0)
    assert core.state == S.ROLLING_BACK
    core.handle(ev.GuestResumed(False, "source QEMU is gone", gone=True), 6.5)
    assert core.state == S.FAILED and core.source_gone
