"""Test helper: follow the workload's output lines from a pipe or a serial socket."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from trustmig.hypervisor.console_protocol import ConsoleEvent, Heartbeat, parse_console_line


class LineStream:
    """Reads lines on a thread; heartbeats and other lines are queued separately.

    ``read`` returns b"" at end of stream.  Heartbeats arrive 100 times a second, so keeping them
    apart lets a test wait for a command reply without wading through them.
    """

    def __init__(self, read: Callable[[], bytes], write: Callable[[bytes], None]) -> None:
        self._read = read
        self._write = write
        self.heartbeats: queue.Queue[Heartbeat] = queue.Queue()
        self.lines: queue.Queue[str] = queue.Queue()
        self.transcript: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = b""
        while True:
            try:
                data = self._read()
            except OSError:
                return
            if not data:
                return
            buf += data
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace").strip("\r\x00 ")
                if not line:
                    continue
                event = parse_console_line(line)
                if isinstance(event, Heartbeat):
                    self.heartbeats.put(event)
                else:
                    self.transcript.append(line)
                    self.lines.put(line)

    def send(self, command: str) -> None:
        self._write(command.encode() + b"\n")

    def wait_line(self, prefix: str, timeout: float) -> str:
        """The next non-heartbeat line starting with ``prefix``; earlier lines are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no line starting with {prefix!r} within {timeout}s; "
                    f"last lines: {self.transcript[-10:]}"
                )
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line

    def command(self, command: str, reply_prefix: str, timeout: float = 60.0) -> ConsoleEvent:
        self.send(command)
        line = self.wait_line(reply_prefix, timeout)
        event = parse_console_line(line)
        assert event is not None, f"unparseable reply to {command!r}: {line!r}"
        return event

    def collect_heartbeats(self, count: int, timeout: float) -> list[Heartbeat]:
        """The next ``count`` heartbeats (after draining those already queued)."""
        while not self.heartbeats.empty():
            self.heartbeats.get_nowait()
        beats: list[Heartbeat] = []
        deadline = time.monotonic() + timeout
        while len(beats) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"only {len(beats)} of {count} heartbeats in {timeout}s")
            try:
                beats.append(self.heartbeats.get(timeout=left))
            except queue.Empty:
                continue
        return beats
