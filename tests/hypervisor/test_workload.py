"""tm-workload compiled for the host and run as a plain process.

The guest program's logic (self-checking pages, dirtying, markers, commands) is the same inside and
outside a VM, and on the host a test can tamper with its memory through /proc/<pid>/mem, the way a
man in the middle would tamper with the migration stream.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from trustmig.hypervisor.console_protocol import (
    CheckResult,
    CommandError,
    Paused,
    RateSet,
    Ready,
    Resumed,
    SecretAt,
    parse_console_line,
)
from trustmig.hypervisor.image import GCC_FLAGS

from .line_stream import LineStream

SECRET = b"TRUSTMIG-SECRET-MARKER-7f3a9c"
MIB = 1 << 20
PAGE = 4096


@pytest.fixture(scope="module")
def workload_exe() -> Iterator[Path]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="tm-workload-"))
    try:
        source = resources.files("trustmig.hypervisor").joinpath("guest", "workload.c")
        src = tmp / "workload.c"
        src.write_bytes(source.read_bytes())
        exe = tmp / "tm-workload"
        subprocess.run(["gcc", *GCC_FLAGS, "-o", str(exe), str(src), "-lm"], check=True)
        yield exe
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Running:
    def __init__(self, proc: subprocess.Popen[bytes], stream: LineStream) -> None:
        self.proc = proc
        self.stream = stream

    def read_mem(self, address: int, size: int) -> bytes:
        with open(f"/proc/{self.proc.pid}/mem", "rb", buffering=0) as mem:
            mem.seek(address)
            return mem.read(size)

    def write_mem(self, address: int, data: bytes) -> None:
        with open(f"/proc/{self.proc.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(address)
            mem.write(data)

    def count_in_memory(self, needle: bytes) -> int:
        """Occurrences of ``needle`` in every readable private mapping of the process."""
        total = 0
        with open(f"/proc/{self.proc.pid}/maps") as maps:
            regions = [line.split() for line in maps]
        for fields in regions:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if not fields[1].startswith("r") or (len(fields) > 5 and fields[5] == "[vvar]"):
                continue
            try:
                data = self.read_mem(start, end - start)
            except OSError:
                continue
            total += data.count(needle)
        return total


@pytest.fixture
def run_workload(workload_exe: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> Running:
        proc = subprocess.Popen(
            [str(workload_exe), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdin is not None
        out, inp = proc.stdout, proc.stdin

        def write(data: bytes) -> None:
            inp.write(data)
            inp.flush()

        stream = LineStream(lambda: os.read(out.fileno(), 65536), write)
        return Running(proc, stream)

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _ready(w: Running) -> Ready:
    event = parse_console_line(w.stream.wait_line("READY", 30))
    assert isinstance(event, Ready)
    return event


def _check(w: Running) -> CheckResult:
    event = w.stream.command("check", "CHECK ")
    assert isinstance(event, CheckResult)
    return event


def test_idle_memory_checks_clean_with_a_stable_digest(run_workload) -> None:
    w = run_workload("mem_mib=4", "marker_pages=16")
    assert _ready(w) == Ready(4, 16)
    first, second = _check(w), _check(w)
    assert first == CheckResult(4 * 256, 0, -1, 16, 16, first.digest)
    assert second.digest == first.digest


def test_heartbeats_are_consecutive_and_move_forward(run_workload) -> None:
    w = run_workload("mem_mib=1", "hb_ms=5")
    _ready(w)
    beats = w.stream.collect_heartbeats(20, timeout=30)
    assert [b.seq for b in beats] == list(range(beats[0].seq, beats[0].seq + 20))
    assert all(b.mono_ns > a.mono_ns for a, b in itertools.pairwise(beats))


def test_dirtying_rewrites_pages_consistently_and_pause_freezes_them(run_workload) -> None:
    w = run_workload("mem_mib=2", "dirty_rate=0")
    _ready(w)
    idle = _check(w)
    assert w.stream.command("rate 40", "RATE") == RateSet(40.0)
    w.stream.collect_heartbeats(30, timeout=30)  # let some dirtying happen
    dirtied = _check(w)
    assert dirtied.bad_pages == 0 and dirtied.marker_ok == 64
    assert dirtied.digest != idle.digest, "generations did not change at 40 MiB/s"
    assert w.stream.command("pause", "PAUSED") == Paused()
    frozen = _check(w)
    w.stream.collect_heartbeats(30, timeout=30)
    assert _check(w).digest == frozen.digest
    assert w.stream.command("resume", "RESUMED") == Resumed()


def test_commands_and_errors(run_workload) -> None:
    w = run_workload("mem_mib=1")
    _ready(w)
    assert w.stream.command("bogus", "ERR") == CommandError("unknown command")
    event = w.stream.command("rate fast", "ERR")
    assert isinstance(event, CommandError) and "bad rate" in event.message
    assert w.stream.command("rate 2.5", "RATE") == RateSet(2.5)
    assert isinstance(w.stream.command("secret", "SECRET_AT"), SecretAt)


def test_secret_plaintext_lives_only_in_the_marker_pages(run_workload, workload_exe: Path) -> None:
    assert SECRET not in workload_exe.read_bytes()
    w = run_workload("mem_mib=1", "marker_pages=64")
    _ready(w)
    at = w.stream.command("secret", "SECRET_AT")
    assert isinstance(at, SecretAt)
    assert w.read_mem(at.address, len(SECRET)) == SECRET
    assert w.count_in_memory(SECRET) == 64


def test_custom_secret_is_taken_from_hex(run_workload) -> None:
    secret = b"another-secret"
    w = run_workload("mem_mib=1", "marker_pages=4", f"secret_hex={secret.hex()}")
    _ready(w)
    at = w.stream.command("secret", "SECRET_AT")
    assert isinstance(at, SecretAt)
    assert w.read_mem(at.address + 2 * PAGE, len(secret)) == secret
    assert _check(w).marker_ok == 4


def test_rewritten_marker_is_detected(run_workload) -> None:
    w = run_workload("mem_mib=1", "marker_pages=64")
    _ready(w)
    at = w.stream.command("secret", "SECRET_AT")
    assert isinstance(at, SecretAt)
    # what a man in the middle does: rewrite the plaintext marker in three pages
    for page in (0, 10, 63):
        w.write_mem(at.address + page * PAGE, b"X" * len(SECRET))
    assert w.stream.wait_line("MARKER_MISMATCH", 30) == "MARKER_MISMATCH bad=3/64"
    assert _check(w).marker_ok == 61


def _pattern_base(w: Running, mem_mib: int, secret_at: int) -> int:
    """Where the pattern pages start: found by their self-describing (index, generation) headers."""
    with open(f"/proc/{w.proc.pid}/maps") as maps:
        regions = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps]
    for start, end in regions:
        for base in range(start, end - mem_mib * MIB + 1, PAGE):
            head = w.read_mem(base, 16) + w.read_mem(base + PAGE, 16)
            if head == (0).to_bytes(16, "little") + (1).to_bytes(8, "little") + bytes(8):
                return base
    raise AssertionError(f"pattern pages not found (markers at {secret_at:#x})")


def test_corrupted_pattern_page_is_reported(run_workload) -> None:
    w = run_workload("mem_mib=1", "marker_pages=2")
    _ready(w)
    at = w.stream.command("secret", "SECRET_AT")
    assert isinstance(at, SecretAt)
    base = _pattern_base(w, 1, at.address)
    w.write_mem(base + 5 * PAGE + 1000, b"\xff" * 8)
    w.write_mem(base + 9 * PAGE, (99).to_bytes(8, "little"))  # wrong index in the header
    result = _check(w)
    assert (result.bad_pages, result.first_bad, result.marker_ok) == (2, 5, 2)


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("mem_mib=lots", "bad tm.mem_mib=lots"),
        ("dirty_rate=-3", "bad tm.dirty_rate=-3"),
        ("hb_ms=0", "bad tm.hb_ms=0"),
        ("secret_hex=abc", "bad tm.secret_hex"),
        ("secret_hex=zz", "'z' is not a hex digit"),
        ("colour=blue", "unknown argument colour"),
        ("noequals", "expected key=value"),
    ],
)
def test_bad_arguments_fail_with_one_clear_line(workload_exe: Path, arg: str, message: str) -> None:
    proc = subprocess.run(
        [str(workload_exe), arg],
        capture_output=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FATAL ") and message in lines[0]
    assert not re.search(r"\bHB\b", proc.stdout.decode())


def test_the_service_hands_out_its_secret_and_the_probe_reports_what_came_back(
    run_workload,
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w = run_workload("mem_mib=1", f"serve={port}")
    _ready(w)
    w.stream.wait_line("SERVING", 10)
    got = _raw(w, f"connect 127.0.0.1 {port}", "NET ")
    assert got.endswith("ok bytes=1024"), got
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        banner = c.recv(2048)
    assert banner.startswith(b"TMSERVICE ")
    closed = _raw(w, f"connect 127.0.0.1 {port + 1 if port < 65535 else 1}", "NET ")
    assert closed.endswith("refused"), closed
    assert "ERR connect" in _raw(w, "connect nowhere 80", "ERR")


def _raw(w: Running, command: str, prefix: str) -> str:
    w.stream.send(command)
    return w.stream.wait_line(prefix, 15)
