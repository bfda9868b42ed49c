"""Migration options: which streams QEMU opens, in which order, and which capabilities both
QEMUs get (pure logic; the VM tests run the same options through real QEMUs)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trustmig.hypervisor.migration import MigrationOptions, _caps


def _cap(opts: MigrationOptions, name: str, *, source: bool = True) -> bool:
    return {c["capability"]: c["state"] for c in _caps(opts, source=source)}[name]


def test_precopy_opens_one_stream_and_no_preempt_channel() -> None:
    opts = MigrationOptions()
    assert (opts.streams, opts.preempt, opts.latency_streams) == (1, False, (0,))
    assert not _cap(opts, "postcopy-preempt")


def test_postcopy_opens_the_preempt_channel_second_on_both_qemus() -> None:
    opts = MigrationOptions(mode="postcopy")
    assert opts.streams == 2 and opts.recovery_streams == 2
    assert opts.latency_streams == (0, 1)  # the device state, then the faulted pages
    assert _cap(opts, "postcopy-preempt", source=True)
    assert _cap(opts, "postcopy-preempt", source=False)


def test_postcopy_without_preempt_keeps_one_stream_and_favours_the_main_one() -> None:
    opts = MigrationOptions(mode="postcopy", postcopy_preempt=False)
    assert (opts.streams, opts.recovery_streams, opts.latency_streams) == (1, 1, (0,))
    assert not _cap(opts, "postcopy-preempt")


def test_qemu_tls_never_asks_for_the_preempt_channel() -> None:
    opts = MigrationOptions(mode="postcopy", channel="qemu-tls")
    assert not opts.preempt and opts.streams == 1
    assert not _cap(opts, "postcopy-preempt", source=False)


def test_multifd_streams_follow_the_main_one() -> None:
    assert MigrationOptions(multifd=4).streams == 5


def test_postcopy_with_multifd_is_refused_in_one_line() -> None:
    with pytest.raises(ValidationError, match="post-copy and multifd cannot be combined"):
        MigrationOptions(mode="postcopy", multifd=2)
