"""The destination core: its walks, timers, journal record and safety rules by name."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmig.migration import actions as A
from trustmig.migration import events as ev
from trustmig.migration.destination import (
    GUEST_MAY_BE_KILLED,
    OWNER,
    DestinationCore,
    DestinationPlan,
    DestinationState,
)

from .samples import SAMPLES

D = DestinationState


def kinds(acts: list[A.Action]) -> list[str]:
    return [type(a).__name__ for a in acts if not isinstance(a, A.Persist | A.Audit | A.Emit)]


def receiving(plan: DestinationPlan | None = None) -> DestinationCore:
    core = DestinationCore("m-1", "vm1", "host-a", 3, plan or DestinationPlan(), now=0.0)
    core.handle(ev.SessionClaimed(), 0.5)
    assert core.state == D.RECEIVING
    return core


def test_precopy_commit_journals_ownership_before_the_guest_runs() -> None:
    core = receiving()
    core.handle(ev.QemuStatus("completed"), 1.0)
    assert core.state == D.LOADED
    acts = core.handle(ev.CommitRequested(7), 1.1)
    assert core.state == D.COMMITTED
    assert isinstance(acts[0], A.Persist)
    assert kinds(acts) == ["ResumeGuest"]
    acts = core.handle(ev.GuestResumed(True, request_id=7), 1.2)
    assert kinds(acts) == ["AdoptGuest", "ReleaseAdmission", "Reply"]
    adopt = next(a for a in acts if isinstance(a, A.AdoptGuest))
    reply = next(a for a in acts if isinstance(a, A.Reply))
    assert adopt.epoch == 4 and reply.ok and reply.request_id == 7
    assert reply.result["epoch"] == 4


def test_commit_before_the_last_bytes_waits_for_the_load() -> None:
    core = receiving()
    assert core.handle(ev.CommitRequested(7), 1.0) == []
    acts = core.handle(ev.QemuStatus("completed"), 1.2)
    assert core.state == D.COMMITTED and kinds(acts) == ["ResumeGuest"]


def test_commit_whose_load_never_finishes_is_refused_and_discarded() -> None:
    core = receiving(DestinationPlan(load_timeout_s=10))
    core.handle(ev.CommitRequested(7), 1.0)
    acts = core.handle_timer(11.0)
    assert core.state == D.ABORTED
    reply = next(a for a in acts if isinstance(a, A.Reply))
    assert not reply.ok and reply.code == "aborted"


def test_repeated_commit_after_a_lost_answer_is_answered_again() -> None:
    core = receiving()
    core.handle(ev.QemuStatus("completed"), 1.0)
    core.handle(ev.CommitRequested(7), 1.1)
    core.handle(ev.GuestResumed(True, request_id=7), 1.2)
    acts = core.handle(ev.CommitRequested(8), 5.0)
    assert kinds(acts) == ["Reply"] and acts[0].ok  # type: ignore[attr-defined]


def test_guest_that_does_not_start_after_a_commit_is_discarded_and_refused() -> None:
    core = receiving()
    core.handle(ev.QemuStatus("completed"), 1.0)
    core.handle(ev.CommitRequested(7), 1.1)
    acts = core.handle(ev.GuestResumed(False, "QEMU absent", 7), 1.2)
    assert core.state == D.ABORTED
    reply = next(a for a in acts if isinstance(a, A.Reply))
    assert reply.code == "aborted"


def test_orphaned_precopy_is_discarded_after_the_lease() -> None:
    core = receiving(DestinationPlan(orphan_timeout_s=30))
    core.handle(ev.ControlLost("reset"), 1.0)
    assert core.handle_timer(30.0) == []
    core.handle(ev.QemuStatus("completed"), 20.0)
    acts = core.handle_timer(31.0)
    assert core.state == D.ABORTED and "KillIncoming" in kinds(acts)
    reply = core.handle(ev.CommitRequested(9), 40.0)
    assert reply and not reply[0].ok and reply[0].code == "aborted"  # type: ignore[attr-defined]


def test_source_back_within_the_lease_keeps_the_incoming_guest() -> None:
    core = receiving(DestinationPlan(orphan_timeout_s=30))
    core.handle(ev.ControlLost("reset"), 1.0)
    core.handle(ev.ControlRestored(), 10.0)
    assert core.handle_timer(100.0) == [] and core.state == D.RECEIVING


def test_prepare_without_a_session_expires() -> None:
    core = DestinationCore("m", "vm", "host-a", 1, DestinationPlan(prepare_timeout_s=5), now=0.0)
    acts = core.handle_timer(5.0)
    assert core.state == D.ABORTED and "KillIncoming" in kinds(acts)


def test_postcopy_switch_runs_the_guest_here_and_it_is_never_discarded() -> None:
    core = receiving(DestinationPlan(postcopy=True))
    acts = core.handle(ev.QemuStatus("postcopy-active"), 2.0)
    assert core.state == D.POSTCOPY and kinds(acts) == ["ResumeGuest"]
    acts = core.handle(ev.AbortRequested(3, "source says so"), 2.5)
    assert core.state == D.POSTCOPY and acts[0].code == "in_doubt"  # type: ignore[attr-defined]
    core.handle(ev.StreamFailed("stream 0: reset", "postcopy-paused"), 3.0)
    assert core.state == D.POSTCOPY_PAUSED
    acts = core.handle(ev.RecoverRequested(4), 4.0)
    assert kinds(acts) == ["ArmRecover"]
    acts = core.handle(ev.RecoverArmed(4), 4.1)
    assert core.state == D.RECOVERING and acts[-1].ok  # type: ignore[attr-defined]
    assert core.may_claim_session()
    core.handle(ev.SessionClaimed(), 4.5)
    assert core.state == D.POSTCOPY
    core.handle(ev.QemuStatus("completed"), 6.0)
    assert core.state == D.COMMITTED


def test_unresponsive_qemu_of_a_postcopy_migration_is_kept() -> None:
    core = receiving(DestinationPlan(postcopy=True))
    acts = core.handle(ev.StreamFailed("stream 0: reset", "unknown"), 2.0)
    assert core.state == D.POSTCOPY_PAUSED and "KillIncoming" not in kinds(acts)


def test_unresponsive_qemu_of_a_precopy_migration_is_discarded() -> None:
    core = receiving(DestinationPlan(postcopy=False))
    core.handle(ev.StreamFailed("stream 0: reset", "unknown"), 2.0)
    assert core.state == D.ABORTED


@pytest.mark.parametrize("name", list(SAMPLES))
def test_nothing_kills_the_destination_guest_after_the_postcopy_switch(name: str) -> None:
    for state in (D.POSTCOPY, D.POSTCOPY_PAUSED, D.RECOVERING):
        core = DestinationCore("m", "vm", "host-a", 1, DestinationPlan(postcopy=True), state=state)
        acts = core.handle(SAMPLES[name], 1.0) + core.handle_timer(1e9)
        assert not any(isinstance(a, A.KillIncoming) for a in acts), (state, name)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(sorted(SAMPLES)), min_size=1, max_size=60))
def test_random_walks_keep_the_destination_rules(names: list[str]) -> None:
    """The guest runs only after a commit or the switch; once it may have run it is never
    killed; once a commit was answered yes, it is never answered no."""
    core = DestinationCore("m", "vm", "host-a", 1, DestinationPlan(postcopy=True), now=0.0)
    said_yes = False
    t = 0.0
    for name in names:
        e = SAMPLES[name]
        t += 11.0
        before = core.state
        acts = core.handle(e, t) + core.handle_timer(t)
        if any(isinstance(a, A.ResumeGuest) for a in acts):
            assert core.state in OWNER
        if any(isinstance(a, A.KillIncoming) for a in acts):
            assert before in GUEST_MAY_BE_KILLED or (before == D.COMMITTED and not core.switched)
            assert not said_yes
        for r in (a for a in acts if isinstance(a, A.Reply)):
            if r.ok and core.state == D.COMMITTED and isinstance(e, ev.GuestResumed):
                said_yes = True
        if said_yes:
            assert core.state == D.COMMITTED


def test_restart_with_live_data_path_keeps_receiving() -> None:
    core = DestinationCore.restore(receiving().record())
    acts = core.handle(ev.Restarted(True, "active", True), 10.0)
    assert core.state == D.RECEIVING and acts == []
    assert core.get_timer() is not None, "an orphan lease runs until the source is back"


def test_restart_finds_the_data_path_gone_before_the_handover() -> None:
    core = DestinationCore.restore(receiving().record())
    acts = core.handle(ev.Restarted(True, "active", False), 10.0)
    assert core.state == D.ABORTED and "KillIncoming" in kinds(acts)


def test_restart_after_the_commit_runs_the_guest() -> None:
    core = receiving()
    core.handle(ev.QemuStatus("completed"), 1.0)
    core.handle(ev.CommitRequested(7), 1.1)  # journaled, then the agent died before 'cont'
    core = DestinationCore.restore(core.record())
    assert kinds(core.handle(ev.Restarted(True, "completed", False), 5.0)) == ["ResumeGuest"]


def test_record_round_trips_through_the_journal() -> None:
    core = receiving(DestinationPlan(postcopy=True, orphan_timeout_s=12))
    core.handle(ev.QemuStatus("postcopy-active"), 1.0)
    back = DestinationCore.restore(core.record())
    assert back.record() == core.record() and back.switched


def test_repeated_commits_keep_the_first_load_deadline_and_answer_the_older_one() -> None:
    core = receiving(DestinationPlan(load_timeout_s=10))
    core.handle(ev.CommitRequested(7), 1.0)
    acts = core.handle(ev.CommitRequested(8), 8.0)
    assert [a.request_id for a in acts if isinstance(a, A.Reply)] == [7]
    acts = core.handle_timer(11.0)
    assert core.state == D.ABORTED
    assert [a.request_id for a in acts if isinstance(a, A.Reply)] == [8]
