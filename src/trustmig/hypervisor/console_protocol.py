"""The line protocol ``tm-workload`` speaks on the guest's serial console.

The serial console also carries kernel messages, init output and, when a reader connects
mid-stream, fragments of lines.  Parsing is therefore forgiving by design: a line that is not a
well-formed protocol line yields ``None`` instead of an exception, so one garbled line can never
stop a console reader.  Commands go the other way and are validated strictly, because a typo there
is a caller's bug.

Guest output lines (one ``write()`` each, see ``guest/workload.c``)::

    HB <seq> <guest-monotonic-ns>
    READY mem_mib=<n> marker_pages=<m>
    CHECK pages=<n> bad_pages=<b> first_bad=<idx|-1> marker_ok=<k>/<m> digest=<16 hex>
    PAUSED | RESUMED | RATE <MiB/s> | SECRET_AT <0xaddr>
    MARKER_MISMATCH bad=<n>/<m>
    ERR <message> | FATAL <message>
    INIT ready ... | INIT workload_exited rc=<n>
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "CheckResult",
    "CommandError",
    "ConsoleEvent",
    "ConsoleProtocolError",
    "Heartbeat",
    "InitReady",
    "MarkerMismatch",
    "Paused",
    "RateSet",
    "Ready",
    "Resumed",
    "SecretAt",
    "WorkloadExited",
    "WorkloadFatal",
    "format_command",
    "parse_console_line",
]


class ConsoleProtocolError(ValueError):
    """A command for the guest workload is malformed; the message says how to fix it."""


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat; gaps in ``mono_ns`` (guest clock) measure the pause the guest felt."""

    seq: int
    mono_ns: int


@dataclass(frozen=True)
class Ready:
    """The workload has filled its memory and accepts commands."""

    mem_mib: int
    marker_pages: int


@dataclass(frozen=True)
class CheckResult:
    """Outcome of ``check``: an intact guest has ``bad_pages == 0`` and all markers intact."""

    pages: int
    bad_pages: int
    first_bad: int
    marker_ok: int
    marker_total: int
    digest: str

    @property
    def intact(self) -> bool:
        return self.bad_pages == 0 and self.marker_ok == self.marker_total


@dataclass(frozen=True)
class Paused:
    """Dirtying stopped (reply to ``pause``)."""


@dataclass(frozen=True)
class Resumed:
    """Dirtying restarted (reply to ``resume``)."""


@dataclass(frozen=True)
class RateSet:
    """New dirty rate in MiB/s (reply to ``rate``)."""

    rate: float


@dataclass(frozen=True)
class SecretAt:
    """Guest-virtual address of the first marker page (reply to ``secret``)."""

    address: int


@dataclass(frozen=True)
class MarkerMismatch:
    """The periodic checker saw the number of broken marker pages change."""

    bad: int
    total: int


@dataclass(frozen=True)
class CommandError:
    """The workload rejected a command (``ERR ...``)."""

    message: str


@dataclass(frozen=True)
class WorkloadFatal:
    """The workload refused to start (``FATAL ...``), e.g. a bad ``tm.*`` kernel argument."""

    message: str


@dataclass(frozen=True)
class InitReady:
    """``/init`` has started the workload."""


@dataclass(frozen=True)
class WorkloadExited:
    """The workload process ended; the guest keeps running without it."""

    rc: int


ConsoleEvent = (
    Heartbeat
    | Ready
    | CheckResult
    | Paused
    | Resumed
    | RateSet
    | SecretAt
    | MarkerMismatch
    | CommandError
    | WorkloadFatal
    | InitReady
    | WorkloadExited
)

_UINT = r"(\d{1,20})"
_HB = re.compile(rf"HB {_UINT} {_UINT}")
_READY = re.compile(rf"READY mem_mib={_UINT} marker_pages={_UINT}")
_CHECK = re.compile(
    rf"CHECK pages={_UINT} bad_pages={_UINT} first_bad=(-1|\d{{1,20}}) "
    rf"marker_ok={_UINT}/{_UINT} digest=([0-9a-f]{{16}})"
)
_RATE = re.compile(r"RATE (\S+)")
_SECRET = re.compile(r"SECRET_AT (0x[0-9a-fA-F]{1,16})")
_MISMATCH = re.compile(rf"MARKER_MISMATCH bad={_UINT}/{_UINT}")
_EXITED = re.compile(r"INIT workload_exited rc=(-?\d{1,10})")


def parse_console_line(line: str) -> ConsoleEvent | None:
    """Parse one console line (with or without its line ending); ``None`` if it is not protocol."""
    line = line.strip("\r\n\x00 \t")
    head = line.split(" ", 1)[0]
    if head == "HB":
        if m := _HB.fullmatch(line):
            return Heartbeat(int(m[1]), int(m[2]))
    elif head == "READY":
        if m := _READY.fullmatch(line):
            return Ready(int(m[1]), int(m[2]))
    elif head == "CHECK":
        if m := _CHECK.fullmatch(line):
            return CheckResult(int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]), m[6])
    elif line == "PAUSED":
        return Paused()
    elif line == "RESUMED":
        return Resumed()
    elif head == "RATE":
        if m := _RATE.fullmatch(line):
            rate = _float_or_none(m[1])
            return RateSet(rate) if rate is not None else None
    elif head == "SECRET_AT":
        if m := _SECRET.fullmatch(line):
            return SecretAt(int(m[1], 16))
    elif head == "MARKER_MISMATCH":
        if m := _MISMATCH.fullmatch(line):
            return MarkerMismatch(int(m[1]), int(m[2]))
    elif head == "ERR" and len(line) > 4:
        return CommandError(line[4:])
    elif head == "FATAL" and len(line) > 6:
        return WorkloadFatal(line[6:])
    elif head == "INIT":
        if line == "INIT ready" or line.startswith("INIT ready "):
            return InitReady()
        if m := _EXITED.fullmatch(line):
            return WorkloadExited(int(m[1]))
    return None


def _float_or_none(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


_SIMPLE_COMMANDS = frozenset({"check", "pause", "resume", "secret"})


def format_command(command: str, rate: float | None = None) -> bytes:
    """The bytes to write to the console for ``command`` (``rate`` only with ``"rate"``)."""
    if command == "rate":
        if rate is None or not math.isfinite(rate) or rate < 0:
            raise ConsoleProtocolError(
                f"bad dirty rate {rate!r}: pass a finite number of MiB/s >= 0"
            )
        return f"rate {rate:g}\n".encode()
    if command not in _SIMPLE_COMMANDS:
        raise ConsoleProtocolError(
            f"unknown workload command {command!r}: use check, pause, resume, rate or secret"
        )
    if rate is not None:
        raise ConsoleProtocolError(f"{command!r} takes no rate: pass rate only with 'rate'")
    return f"{command}\n".encode()
