"""Maintenance windows, including windows that run across midnight and week ends."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trustmig.policy import parse_window


def at(day: int, hour: int, minute: int = 0, tz: dt.tzinfo = dt.UTC) -> dt.datetime:
    """2024-06-03 is a Monday; ``day`` 0 = Monday."""
    return dt.datetime(2024, 6, 3 + day, hour, minute, tzinfo=tz)


MON, TUE, FRI, SAT, SUN = 0, 1, 4, 5, 6


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        (at(MON, 22, 0), True),  # opens
        (at(MON, 23, 59), True),
        (at(TUE, 3, 0), True),  # Monday's window, after midnight
        (at(TUE, 6, 0), False),  # end is exclusive
        (at(MON, 21, 59), False),
        (at(MON, 3, 0), False),  # would belong to Sunday's window: there is none
        (at(FRI, 23, 0), True),
        (at(SAT, 5, 59), True),  # Friday's window spills into Saturday
        (at(SAT, 22, 30), False),
        (at(SUN, 12, 0), False),
    ],
)
def test_window_across_midnight(when: dt.datetime, inside: bool) -> None:
    assert parse_window("Mon-Fri 22:00-06:00 UTC").contains(when) is inside


def test_same_day_window_and_day_list() -> None:
    w = parse_window("Sat,Sun 09:00-17:30")
    assert w.contains(at(SAT, 9, 0)) and w.contains(at(SUN, 17, 29))
    assert not w.contains(at(SUN, 17, 30)) and not w.contains(at(FRI, 12, 0))


def test_week_wrapping_day_range() -> None:
    w = parse_window("Fri-Mon 00:00-24:00 UTC")
    assert w.days == frozenset({4, 5, 6, 0})
    assert w.contains(at(MON, 23, 59)) and not w.contains(at(TUE, 0, 0))


def test_window_in_named_zone_converts_the_instant() -> None:
    w = parse_window("daily 01:00-02:00 Europe/Berlin")  # CEST = UTC+2 in June
    assert w.contains(at(MON, 23, 30))
    assert not w.contains(at(MON, 1, 30))


def test_other_offsets_are_converted() -> None:
    w = parse_window("Mon 22:00-23:00 UTC")
    plus2 = dt.timezone(dt.timedelta(hours=2))
    assert w.contains(dt.datetime(2024, 6, 4, 0, 30, tzinfo=plus2))  # = Mon 22:30 UTC


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Mon-Fri 22:00", "HH:MM-HH:MM"),
        ("Mon-Fri 22:00-22:00 UTC", "start equals end"),
        ("Funday 10:00-11:00", "unknown day"),
        ("Mon 10:00-11:00 Mars/Olympus", "unknown time zone"),
        ("Mon 24:30-11:00", "out of range"),
        ("Mon 10:00-11:00 UTC extra", "expected"),
    ],
)
def test_malformed_windows(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_window(text)


def test_naive_time_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_window("daily 00:00-24:00").contains(dt.datetime(2024, 6, 3, 12, 0))


@given(
    st.datetimes(
        min_value=dt.datetime(2020, 1, 1),
        max_value=dt.datetime(2030, 1, 1),
        timezones=st.just(dt.UTC),
    )
)
def test_midnight_window_equals_its_two_halves(when: dt.datetime) -> None:
    """'Mon-Fri 22:00-06:00' is Mon-Fri evenings plus the following mornings (Tue-Sat)."""
    across = parse_window("Mon-Fri 22:00-06:00 UTC")
    evenings = parse_window("Mon-Fri 22:00-24:00 UTC")
    mornings = parse_window("Tue-Sat 00:00-06:00 UTC")
    assert across.contains(when) == (evenings.contains(when) or mornings.contains(when))
