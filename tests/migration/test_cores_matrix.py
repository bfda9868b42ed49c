"""Every (state, event) pair of both cores: the outcome is the expected one, or nothing changes.

The expected tables are the design written down: a pair that is not listed must leave the state
as it was. Every pair also keeps the structural rules: a state change is journaled (``Persist``)
before any other action and writes exactly one ``migration.phase`` audit record per step.
"""

from __future__ import annotations

import pytest

from trustmig.migration import actions as A
from trustmig.migration.destination import (
    TRANSITIONS as DEST_TRANSITIONS,
)
from trustmig.migration.destination import (
    DestinationCore,
    DestinationPlan,
    DestinationState,
)
from trustmig.migration.source import TRANSITIONS as SOURCE_TRANSITIONS
from trustmig.migration.source import SourceCore, SourcePlan, SourceState

from .samples import SAMPLES

EXPECTED_SOURCE = {
    ("requested", "decided-allow"): "preparing",
    ("requested", "decided-deny"): "refused",
    ("requested", "qemu-exited"): "failed",
    ("requested", "restarted-active"): "rolled-back",
    ("requested", "restarted-active-no-relay"): "rolled-back",
    ("requested", "restarted-completed"): "rolled-back",
    ("requested", "restarted-postcopy"): "rolled-back",
    ("requested", "restarted-postcopy-paused"): "rolled-back",
    ("requested", "restarted-unknown"): "rolled-back",
    ("requested", "restarted-qemu-gone"): "rolled-back",
    ("preparing", "prepared"): "handshake",
    ("preparing", "peer-refused"): "refused",
    ("preparing", "peer-unreachable"): "rolled-back",
    ("preparing", "qemu-exited"): "failed",
    ("preparing", "control-lost"): "rolled-back",
    ("preparing", "restarted-active"): "rolled-back",
    ("preparing", "restarted-active-no-relay"): "rolled-back",
    ("preparing", "restarted-completed"): "rolled-back",
    ("preparing", "restarted-postcopy"): "rolled-back",
    ("preparing", "restarted-postcopy-paused"): "rolled-back",
    ("preparing", "restarted-unknown"): "rolled-back",
    ("preparing", "restarted-qemu-gone"): "rolled-back",
    ("handshake", "claim-ok"): "transfer",
    ("handshake", "claim-lie"): "rolled-back",
    ("handshake", "claim-refused"): "rolled-back",
    ("handshake", "data-path-failed"): "rolled-back",
    ("handshake", "stream-failed-active"): "rolled-back",
    ("handshake", "stream-failed-completed"): "rolled-back",
    ("handshake", "stream-failed-postcopy"): "rolled-back",
    ("handshake", "stream-failed-unknown"): "rolled-back",
    ("handshake", "qemu-exited"): "failed",
    ("handshake", "control-lost"): "rolled-back",
    ("handshake", "restarted-active"): "rolled-back",
    ("handshake", "restarted-active-no-relay"): "rolled-back",
    ("handshake", "restarted-completed"): "rolled-back",
    ("handshake", "restarted-postcopy"): "rolled-back",
    ("handshake", "restarted-postcopy-paused"): "rolled-back",
    ("handshake", "restarted-unknown"): "rolled-back",
    ("handshake", "restarted-qemu-gone"): "rolled-back",
    ("transfer", "transfer-start-failed"): "rolling-back",
    ("transfer", "progress-round3"): "postcopy-switching",
    ("transfer", "qemu-completed"): "committing",
    ("transfer", "qemu-failed"): "rolling-back",
    ("transfer", "qemu-cancelled"): "rolling-back",
    ("transfer", "qemu-postcopy-active"): "postcopy",
    ("transfer", "qemu-postcopy-paused"): "postcopy-paused",
    ("transfer", "stream-failed-active"): "rolling-back",
    ("transfer", "stream-failed-completed"): "committing",
    ("transfer", "stream-failed-postcopy"): "postcopy-paused",
    ("transfer", "stream-failed-unknown"): "rolling-back",
    ("transfer", "qemu-exited"): "failed",  # a core made in transfer: no memory sent yet
    ("transfer", "peer-status-aborted"): "rolling-back",
    ("transfer", "peer-status-unknown"): "rolling-back",
    ("transfer", "restarted-active-no-relay"): "rolling-back",
    ("transfer", "restarted-completed"): "awaiting-peer",
    ("transfer", "restarted-postcopy"): "postcopy",
    ("transfer", "restarted-postcopy-paused"): "postcopy-paused",
    ("transfer", "restarted-unknown"): "rolling-back",
    ("transfer", "restarted-qemu-gone"): "awaiting-peer",
    ("postcopy-switching", "qemu-completed"): "committing",
    ("postcopy-switching", "qemu-failed"): "rolling-back",
    ("postcopy-switching", "qemu-cancelled"): "rolling-back",
    ("postcopy-switching", "qemu-postcopy-active"): "postcopy",
    ("postcopy-switching", "qemu-postcopy-paused"): "postcopy-paused",
    ("postcopy-switching", "stream-failed-active"): "rolling-back",
    ("postcopy-switching", "stream-failed-completed"): "committing",
    ("postcopy-switching", "stream-failed-postcopy"): "postcopy-paused",
    ("postcopy-switching", "stream-failed-unknown"): "postcopy-paused",
    ("postcopy-switching", "qemu-exited"): "failed",
    ("postcopy-switching", "switch-refused"): "transfer",
    ("postcopy-switching", "restarted-active"): "transfer",
    ("postcopy-switching", "restarted-active-no-relay"): "rolling-back",
    ("postcopy-switching", "restarted-completed"): "awaiting-peer",
    ("postcopy-switching", "restarted-postcopy"): "postcopy",
    ("postcopy-switching", "restarted-postcopy-paused"): "postcopy-paused",
    ("postcopy-switching", "restarted-unknown"): "rolling-back",
    ("postcopy-switching", "restarted-qemu-gone"): "failed",
    ("postcopy", "qemu-completed"): "completed",
    ("postcopy", "qemu-failed"): "postcopy-paused",
    ("postcopy", "qemu-postcopy-paused"): "postcopy-paused",
    ("postcopy", "stream-failed-active"): "postcopy-paused",
    ("postcopy", "stream-failed-completed"): "postcopy-paused",
    ("postcopy", "stream-failed-postcopy"): "postcopy-paused",
    ("postcopy", "stream-failed-unknown"): "postcopy-paused",
    ("postcopy", "qemu-exited"): "failed",
    ("postcopy", "restarted-completed"): "completed",
    ("postcopy", "restarted-postcopy-paused"): "postcopy-paused",
    ("postcopy", "restarted-qemu-gone"): "failed",
    ("postcopy-paused", "qemu-completed"): "completed",
    ("postcopy-paused", "qemu-exited"): "failed",
    ("postcopy-paused", "recovery-done"): "postcopy",
    ("postcopy-paused", "restarted-completed"): "completed",
    ("postcopy-paused", "restarted-qemu-gone"): "failed",
    ("awaiting-peer", "commit-answered"): "completed",
    ("awaiting-peer", "peer-status-committed"): "completed",
    ("awaiting-peer", "peer-status-loaded"): "committing",
    ("awaiting-peer", "peer-status-aborted"): "rolling-back",
    ("awaiting-peer", "peer-status-unknown"): "rolling-back",
    ("awaiting-peer", "resolve-destination"): "completed",
    ("awaiting-peer", "resolve-source"): "rolling-back",
    ("committing", "commit-answered"): "completed",
    ("committing", "commit-refused-aborted"): "rolling-back",
    ("committing", "peer-status-committed"): "completed",
    ("committing", "peer-status-aborted"): "rolling-back",
    ("committing", "peer-status-unknown"): "rolling-back",
    ("committing", "resolve-destination"): "completed",
    ("committing", "resolve-source"): "rolling-back",
    ("rolling-back", "qemu-exited"): "failed",
    ("rolling-back", "guest-resumed"): "rolled-back",
    ("rolling-back", "guest-not-resumed"): "failed",
    ("rolling-back", "restarted-qemu-gone"): "failed",
}

EXPECTED_DESTINATION = {
    ("prepared", "qemu-exited"): "aborted",
    ("prepared", "session-claimed"): "receiving",
    ("prepared", "commit-requested"): "aborted",
    ("prepared", "abort-requested"): "aborted",
    ("prepared", "restarted-active"): "aborted",
    ("prepared", "restarted-active-no-relay"): "aborted",
    ("prepared", "restarted-completed"): "aborted",
    ("prepared", "restarted-postcopy"): "postcopy",
    ("prepared", "restarted-postcopy-paused"): "postcopy-paused",
    ("prepared", "restarted-unknown"): "aborted",
    ("prepared", "restarted-qemu-gone"): "aborted",
    ("receiving", "qemu-completed"): "loaded",
    ("receiving", "qemu-failed"): "aborted",
    ("receiving", "qemu-cancelled"): "aborted",
    ("receiving", "qemu-postcopy-active"): "postcopy",
    ("receiving", "qemu-postcopy-paused"): "postcopy-paused",
    ("receiving", "stream-failed-active"): "aborted",
    ("receiving", "stream-failed-completed"): "loaded",
    ("receiving", "stream-failed-postcopy"): "postcopy-paused",
    ("receiving", "stream-failed-unknown"): "postcopy-paused",
    ("receiving", "qemu-exited"): "aborted",
    ("receiving", "abort-requested"): "aborted",
    ("receiving", "recover-requested"): "postcopy-paused",
    ("receiving", "restarted-active-no-relay"): "aborted",
    ("receiving", "restarted-completed"): "loaded",
    ("receiving", "restarted-postcopy"): "postcopy",
    ("receiving", "restarted-postcopy-paused"): "postcopy-paused",
    ("receiving", "restarted-unknown"): "postcopy-paused",
    ("receiving", "restarted-qemu-gone"): "aborted",
    ("loaded", "qemu-exited"): "aborted",
    ("loaded", "commit-requested"): "committed",
    ("loaded", "abort-requested"): "aborted",
    ("loaded", "restarted-postcopy"): "postcopy",
    ("loaded", "restarted-postcopy-paused"): "postcopy-paused",
    ("loaded", "restarted-qemu-gone"): "aborted",
    ("postcopy", "qemu-completed"): "committed",
    ("postcopy", "qemu-postcopy-paused"): "postcopy-paused",
    ("postcopy", "stream-failed-active"): "postcopy-paused",
    ("postcopy", "stream-failed-completed"): "postcopy-paused",
    ("postcopy", "stream-failed-postcopy"): "postcopy-paused",
    ("postcopy", "stream-failed-unknown"): "postcopy-paused",
    ("postcopy", "qemu-exited"): "aborted",
    ("postcopy", "recover-requested"): "postcopy-paused",
    ("postcopy", "restarted-completed"): "committed",
    ("postcopy", "restarted-postcopy-paused"): "postcopy-paused",
    ("postcopy", "restarted-unknown"): "postcopy-paused",
    ("postcopy", "restarted-qemu-gone"): "aborted",
    ("postcopy-paused", "qemu-completed"): "committed",
    ("postcopy-paused", "qemu-postcopy-active"): "postcopy",
    ("postcopy-paused", "qemu-exited"): "aborted",
    ("postcopy-paused", "recover-armed"): "recovering",
    ("postcopy-paused", "restarted-completed"): "committed",
    ("postcopy-paused", "restarted-postcopy"): "postcopy",
    ("postcopy-paused", "restarted-qemu-gone"): "aborted",
    ("recovering", "qemu-completed"): "committed",
    ("recovering", "qemu-postcopy-active"): "postcopy",
    ("recovering", "stream-failed-active"): "postcopy-paused",
    ("recovering", "stream-failed-completed"): "postcopy-paused",
    ("recovering", "stream-failed-postcopy"): "postcopy-paused",
    ("recovering", "stream-failed-unknown"): "postcopy-paused",
    ("recovering", "qemu-exited"): "aborted",
    ("recovering", "session-claimed"): "postcopy",
    ("recovering", "restarted-completed"): "committed",
    ("recovering", "restarted-postcopy"): "postcopy",
    ("recovering", "restarted-postcopy-paused"): "postcopy-paused",
    ("recovering", "restarted-unknown"): "postcopy-paused",
    ("recovering", "restarted-qemu-gone"): "aborted",
    ("committed", "guest-not-resumed"): "aborted",
}


def _source(state: SourceState) -> SourceCore:
    return SourceCore("m-1", "vm1", "host-b", 1, SourcePlan(postcopy=True), state=state)


def _destination(state: DestinationState) -> DestinationCore:
    plan = DestinationPlan(postcopy=True)
    return DestinationCore("m-1", "vm1", "host-a", 1, plan, state=state, now=0.0)


def _check_structure(core: object, before: str, acts: list[A.Action]) -> None:
    history = core.history  # type: ignore[attr-defined]
    if not history:
        assert not any(isinstance(a, A.Persist) for a in acts)
        return
    assert isinstance(acts[0], A.Persist), "a state change is journaled before anything else"
    phases = [a for a in acts if isinstance(a, A.Audit) and a.kind == "migration.phase"]
    persists = [a for a in acts if isinstance(a, A.Persist)]
    assert len(persists) == len(history)
    assert [a.outcome for a in phases][: len(history)] == [s for _, s in history]


@pytest.mark.parametrize("state", list(SourceState), ids=str)
@pytest.mark.parametrize("event", list(SAMPLES), ids=str)
def test_source_pair(state: SourceState, event: str) -> None:
    core = _source(state)
    acts = core.handle(SAMPLES[event], 10.0)
    assert core.state.value == EXPECTED_SOURCE.get((state.value, event), state.value)
    _check_structure(core, state.value, acts)


@pytest.mark.parametrize("state", list(DestinationState), ids=str)
@pytest.mark.parametrize("event", list(SAMPLES), ids=str)
def test_destination_pair(state: DestinationState, event: str) -> None:
    core = _destination(state)
    acts = core.handle(SAMPLES[event], 10.0)
    assert core.state.value == EXPECTED_DESTINATION.get((state.value, event), state.value)
    _check_structure(core, state.value, acts)


def test_expected_tables_only_name_allowed_transitions() -> None:
    for (frm, _), to in EXPECTED_SOURCE.items():
        path_ok = SourceState(to) in SOURCE_TRANSITIONS[SourceState(frm)] or any(
            SourceState(to) in SOURCE_TRANSITIONS[mid]
            for mid in SOURCE_TRANSITIONS[SourceState(frm)]
        )
        assert path_ok, (frm, to)
    for (frm, _), to in EXPECTED_DESTINATION.items():
        assert DestinationState(to) in DEST_TRANSITIONS[DestinationState(frm)], (frm, to)


def test_terminal_states_have_no_way_out() -> None:
    from trustmig.migration import destination, source

    for st in source.TERMINAL:
        assert not SOURCE_TRANSITIONS[st]
    assert DEST_TRANSITIONS[DestinationState.ABORTED] == frozenset()
    assert {DestinationState.COMMITTED, DestinationState.ABORTED} == destination.TERMINAL


def test_every_state_is_in_the_tables() -> None:
    assert set(SOURCE_TRANSITIONS) == set(SourceState)
    assert set(DEST_TRANSITIONS) == set(DestinationState)
