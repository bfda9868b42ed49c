"""Parsing of the workload's console lines and formatting of its commands."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trustmig.hypervisor.console_protocol import (
    CheckResult,
    CommandError,
    ConsoleProtocolError,
    Heartbeat,
    InitReady,
    MarkerMismatch,
    Paused,
    RateSet,
    Ready,
    Resumed,
    SecretAt,
    WorkloadExited,
    WorkloadFatal,
    format_command,
    parse_console_line,
)


@pytest.mark.parametrize(
    ("line", "event"),
    [
        ("HB 0 123456789", Heartbeat(0, 123456789)),
        ("HB 42 18446744073709551615\r\n", Heartbeat(42, 18446744073709551615)),
        ("READY mem_mib=32 marker_pages=64", Ready(32, 64)),
        (
            "CHECK pages=8192 bad_pages=0 first_bad=-1 marker_ok=64/64 digest=0123456789abcdef",
            CheckResult(8192, 0, -1, 64, 64, "0123456789abcdef"),
        ),
        (
            "CHECK pages=10 bad_pages=2 first_bad=7 marker_ok=3/64 digest=ffffffffffffffff",
            CheckResult(10, 2, 7, 3, 64, "ffffffffffffffff"),
        ),
        ("PAUSED", Paused()),
        ("RESUMED\r", Resumed()),
        ("RATE 8", RateSet(8.0)),
        ("RATE 2.5", RateSet(2.5)),
        ("SECRET_AT 0x7f4a77192000", SecretAt(0x7F4A77192000)),
        ("MARKER_MISMATCH bad=64/64", MarkerMismatch(64, 64)),
        ("ERR unknown command", CommandError("unknown command")),
        (
            "FATAL bad tm.mem_mib=x: expected an integer",
            WorkloadFatal("bad tm.mem_mib=x: expected an integer"),
        ),
        ("INIT ready workload_pid=73", InitReady()),
        ("INIT ready", InitReady()),
        ("INIT workload_exited rc=2", WorkloadExited(2)),
    ],
)
def test_protocol_lines_parse(line: str, event: object) -> None:
    assert parse_console_line(line) == event


@pytest.mark.parametrize(
    "line",
    [
        "",
        "[    0.000000] Linux version 6.1.0",
        "HB 12",  # truncated
        "HB x 12",
        "B 12 345",  # tail of a line caught mid-stream
        "12 3456789",
        "READY mem_mib=32",
        "CHECK pages=1 bad_pages=0 first_bad=-1 marker_ok=64/64 digest=xyz",
        "CHECK pages=1 bad_pages=0 first_bad=-2 marker_ok=64/64 digest=0123456789abcdef",
        "RATE nan",
        "RATE -1",
        "SECRET_AT 1234",
        "PAUSEDX",
        "INIT something",
        "ERR",
    ],
)
def test_noise_and_malformed_lines_are_not_events(line: str) -> None:
    assert parse_console_line(line) is None


def test_check_result_intact_needs_clean_pages_and_all_markers() -> None:
    assert CheckResult(10, 0, -1, 64, 64, "0" * 16).intact
    assert not CheckResult(10, 1, 3, 64, 64, "0" * 16).intact
    assert not CheckResult(10, 0, -1, 63, 64, "0" * 16).intact


@given(seq=st.integers(0, 2**64 - 1), ns=st.integers(0, 2**64 - 1))
def test_heartbeat_round_trip(seq: int, ns: int) -> None:
    assert parse_console_line(f"HB {seq} {ns}") == Heartbeat(seq, ns)


@given(text=st.text(max_size=80))
def test_arbitrary_text_never_raises(text: str) -> None:
    event = parse_console_line(text)
    assert event is None or type(event).__module__.endswith("console_protocol")


def test_format_command() -> None:
    assert format_command("check") == b"check\n"
    assert format_command("pause") == b"pause\n"
    assert format_command("resume") == b"resume\n"
    assert format_command("secret") == b"secret\n"
    assert format_command("rate", 8) == b"rate 8\n"
    assert format_command("rate", 0.25) == b"rate 0.25\n"


@pytest.mark.parametrize(
    ("command", "rate", "message"),
    [
        ("reboot", None, "unknown workload command 'reboot'"),
        ("rate", None, "bad dirty rate None"),
        ("rate", -1.0, "bad dirty rate -1.0"),
        ("rate", float("inf"), "bad dirty rate inf"),
        ("check", 3.0, "'check' takes no rate"),
    ],
)
def test_format_command_rejects_bad_input(command: str, rate: float | None, message: str) -> None:
    with pytest.raises(ConsoleProtocolError, match=message) as exc:
        format_command(command, rate)
    assert "\n" not in str(exc.value)
