"""Refusal logging and auditing stay bounded under a flood."""

from __future__ import annotations

import logging

import pytest

from trustmig.guard.ratelog import RateLimitedLog, Throttle


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_throttle_admits_a_burst_per_window_and_counts_the_rest() -> None:
    clock = Clock()
    t = Throttle(burst=3, interval_s=10, clock=clock)
    assert [t.admit("k") for _ in range(5)] == [0, 0, 0, None, None]
    assert t.admit("other") == 0  # keys are independent
    clock.t = 10.0
    assert t.admit("k") == 2  # the next admitted event reports what was suppressed


def test_rate_limited_log_says_how_many_lines_it_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("t"), burst=2, interval_s=5, clock=clock)
    with caplog.at_level(logging.INFO, logger="t"):
        written = [rl.log(logging.INFO, "refused", "refused %s", i) for i in range(1000)]
        clock.t = 5.0
        rl.log(logging.INFO, "refused", "refused %s", "again")
    assert sum(written) == 2 and len(caplog.records) == 3
    assert caplog.records[-1].getMessage() == "refused again (and 998 similar lines suppressed)"
