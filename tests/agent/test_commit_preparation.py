"""A commit the source could not prepare: refused while its guest can run again, in doubt once
its QEMU is gone (the destination's copy may be the only complete one)."""

from __future__ import annotations

from trustmig.agent.source_driver import commit_not_prepared
from trustmig.hypervisor.measure import MeasurementError
from trustmig.migration import actions as A
from trustmig.migration import events as ev
from trustmig.migration.source import SourceCore, SourceState


def _committing(source_gone: bool) -> SourceCore:
    core = SourceCore("m-1", "vm1", "host-b", 3, state=SourceState.COMMITTING)
    core.source_gone = source_gone
    return core


def test_with_qemu_alive_the_commit_is_refused_and_the_guest_runs_here_again() -> None:
    event = commit_not_prepared(True, MeasurementError("region kernel: no such symbol"))
    assert isinstance(event, ev.CommitRefused) and event.code == "refused"
    core = _committing(source_gone=False)
    acts = core.handle(event, 1.0)
    assert core.state == SourceState.ROLLING_BACK
    assert any(isinstance(a, A.ResumeGuest) for a in acts)


def test_with_qemu_gone_the_destination_copy_is_kept_in_doubt_never_discarded() -> None:
    event = commit_not_prepared(False, ConnectionResetError("QMP connection lost"))
    assert isinstance(event, ev.CommitLost) and "QMP connection lost" in event.reason
    core = _committing(source_gone=True)
    acts = core.handle(event, 1.0)
    assert core.state == SourceState.COMMITTING
    assert not any(isinstance(a, A.CallPeer) and a.op == "abort" for a in acts)
    assert any(isinstance(a, A.KeepPaused) for a in acts)
