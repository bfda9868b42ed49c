"""A guest's clients, measured while it migrates: an ssh session and a TCP echo stream.

Both run from the client namespace on the guest network, so what they measure is what a user of
the guest sees. The ssh session runs a loop in the guest that prints a counter every 50 ms; the
echo stream sends numbered 1 KiB blocks to an echo server in the guest every 10 ms and checks
every byte that comes back, in order. The report: did both sessions survive, how many bytes were
lost (sent but never echoed, or echoed wrong), and the longest silence each one saw.
"""

from __future__ import annotations

import contextlib
import select
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from trustmig.netns.enter import connect_in

ECHO_PORT = 7777
#: the echo server, in the guest's own Perl (perl-base is in every Debian)
ECHO_SERVER = (
    "nohup perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>%d,Listen=>5,"
    "ReuseAddr=>1) or die; while($c=$s->accept){ while(sysread($c,$b,65536)){ "
    "syswrite($c,$b) } close($c) }' >/dev/null 2>&1 &"
)
SSH_LOOP = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.05; done"
BLOCK = 1024
PERIOD_S = 0.01


@dataclass
class ClientReport:
    """What the clients saw (times in ms)."""

    ssh_survived: bool = False
    ssh_lines: int = 0
    ssh_max_gap_ms: float = 0.0
    echo_survived: bool = False
    echo_bytes_sent: int = 0
    echo_bytes_received: int = 0
    echo_bytes_lost: int = 0
    echo_max_stall_ms: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def survived(self) -> bool:
        return self.ssh_survived and self.echo_survived

    @property
    def max_stall_ms(self) -> float:
        return max(self.ssh_max_gap_ms, self.echo_max_stall_ms)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "client_session_survived": self.survived,
                "client_bytes_lost": self.echo_bytes_lost,
                "client_max_stall_ms": round(self.max_stall_ms, 1)}  # fmt: skip


def _block(n: int) -> bytes:
    head = f"{n:016d}".encode()
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


class ClientProbe:
    """Start with :meth:`start` (the guest's echo server must run), stop with :meth:`stop`."""

    def __init__(self, netns: str, guest_ip: str, ssh_argv: list[str]) -> None:
        self.netns = netns
        self.guest_ip = guest_ip
        self.ssh_argv = ssh_argv  # runs SSH_LOOP in the guest, from the client namespace
        self.report = ClientReport()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ssh: subprocess.Popen[str] | None = None
        self._sock: socket.socket | None = None
        self._expected = bytearray()
        self._lock = threading.Lock()

    def start(self, timeout: float = 30.0) -> None:
        """Connect both clients (the echo server may still be starting: retried)."""
        deadline = time.monotonic() + timeout
        while self._sock is None:
            try:
                self._sock = connect_in(self.netns, self.guest_ip, ECHO_PORT)
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        quiet = subprocess.DEVNULL
        self._ssh = subprocess.Popen(self.ssh_argv, stdout=subprocess.PIPE, text=True,
                                     stderr=quiet, stdin=quiet)  # fmt: skip
        for fn in (self._send, self._receive, self._read_ssh):
            t = threading.Thread(target=fn, daemon=True, name=f"client-{fn.__name__}")
            t.start()
            self._threads.append(t)

    def _send(self) -> None:
        assert self._sock is not None
        n = 0
        try:
            while not self._stop.is_set():
                block = _block(n)
                with self._lock:
                    self._expected += block
                self._sock.sendall(block)
                self.report.echo_bytes_sent += len(block)
                n += 1
                time.sleep(PERIOD_S)
        except OSError as e:
            self.report.errors.append(f"echo send: {e}")

    def _receive(self) -> None:
        assert self._sock is not None
        last = time.monotonic()
        while True:
            # a readiness wait, not a socket timeout: the sender shares the socket, and a timeout
            # set here would also end its ``sendall`` when a pause fills the send buffer
            ready, _, _ = select.select([self._sock], [], [], 0.5)
            if not ready:
                if (
                    self._stop.is_set()
                    and self.report.echo_bytes_received >= self.report.echo_bytes_sent
                ):
                    return
                continue
            try:
                data = self._sock.recv(65536)
            except OSError as e:
                self.report.errors.append(f"echo receive: {e}")
                return
            if not data:
                self.report.errors.append("echo stream closed by the guest")
                return
            now = time.monotonic()
            self.report.echo_max_stall_ms = max(self.report.echo_max_stall_ms, (now - last) * 1000)
            last = now
            with self._lock:
                want = bytes(self._expected[: len(data)])
                del self._expected[: len(data)]
            if want != data:
                self.report.errors.append(f"echo bytes differ at {self.report.echo_bytes_received}")
                return
            self.report.echo_bytes_received += len(data)

    def _read_ssh(self) -> None:
        assert self._ssh is not None and self._ssh.stdout is not None
        last, expect = time.monotonic(), None
        for line in self._ssh.stdout:
            now = time.monotonic()
            if not line.startswith("tick "):
                continue
            n = int(line.split()[1])
            if expect is not None and n != expect:
                self.report.errors.append(f"ssh loop skipped from {expect} to {n}")
            expect = n + 1
            if self.report.ssh_lines:
                self.report.ssh_max_gap_ms = max(self.report.ssh_max_gap_ms, (now - last) * 1000)
            last = now
            self.report.ssh_lines += 1
            if self._stop.is_set():
                return

    def stop(self, drain_s: float = 5.0) -> ClientReport:
        """Stop sending, wait for the echo of everything sent, end the sessions; the report."""
        self._stop.set()
        deadline = time.monotonic() + drain_s
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        r = self.report
        r.ssh_survived = self._ssh is not None and self._ssh.poll() is None and r.ssh_lines > 0
        r.echo_survived = not any(e.startswith("echo") for e in r.errors)
        r.echo_bytes_lost = r.echo_bytes_sent - r.echo_bytes_received
        if self._ssh is not None:
            self._ssh.kill()
            self._ssh.wait(10)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        return r
