"""Blocking I/O around the sans-IO record layer: one stream of QEMU's migration, both directions.

Each stream is a plaintext unix socket to the local QEMU and a TCP socket to the peer agent. Two
threads move it: *outbound* reads what the local QEMU writes, seals it and sends it; *inbound*
receives records, verifies and decrypts them into a preallocated buffer, and only then writes the
plaintext to QEMU. `cryptography` releases the GIL inside AES-GCM and sockets release it while
blocked, so the two directions and the streams of a multifd migration run in parallel.

Copies per byte: kernel→buffer (recv_into), buffer→ciphertext (encrypt_into), ciphertext→kernel
(sendall); and the mirror image on the receiving side. Receive buffers are fixed-size: a record
header announcing more than the negotiated maximum is refused before its body is read.

On the first failure (authentication, truncation, socket error) the pump closes *both* sockets
(so the peer and the local QEMU see the break at once) and reports a :class:`StreamFailure`
naming the stream and record.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from trustmig.channel.errors import ChannelError
from trustmig.channel.events import Aborted, Data, EndOfStream, KeyUpdated
from trustmig.channel.records import RecordOpener, RecordSealer

SLACK = 4096  # room for record headers, tags and a possible key-update record
#: Receive buffer of the inbound direction (several records per system call).
INBOUND_BUFFER = 2 * 1024 * 1024


@dataclass
class StreamFailure:
    stream: int
    record: int | None
    direction: str
    reason: str

    def line(self) -> str:
        rec = f" record {self.record}" if self.record is not None else ""
        return f"stream {self.stream}{rec} ({self.direction}): {self.reason}"


@dataclass
class StreamStats:
    bytes_out: int = 0
    bytes_in: int = 0
    records_out: int = 0
    records_in: int = 0
    first_byte_at: float | None = None
    finished_out: bool = False
    finished_in: bool = False
    errors: list[StreamFailure] = field(default_factory=list)


def recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` completely; False on a clean EOF before the first byte."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise ChannelError(f"connection closed in the middle of a record ({got} bytes read)")
        got += n
    return True


def tune_tcp(sock: socket.socket, bufsize: int = 4 * 1024 * 1024) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)


#: Socket buffers of a stream that must answer quickly: in post-copy the page the destination
#: guest is waiting for is sent behind everything already queued in the send and receive
#: buffers, so 8 MiB of bulk pages there (4 MiB asked, doubled by the kernel) cost every page
#: fault tens of ms. 256 KiB is still several times the bandwidth-delay product of a LAN link.
LATENCY_BUFFER_BYTES = 256 * 1024


def favour_latency(sock: socket.socket, bufsize: int = LATENCY_BUFFER_BYTES) -> None:
    """Shrink a live connection's buffers (the kernel applies it to what is queued next)."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, bufsize)


class StreamPump:
    """Carries one QEMU migration stream over the secure channel, full duplex."""

    def __init__(
        self,
        index: int,
        plain: socket.socket,
        cipher: socket.socket,
        sealer: RecordSealer,
        opener: RecordOpener,
        *,
        max_plaintext: int,
        on_failure: Callable[[StreamFailure], None],
        on_done: Callable[[int], None] | None = None,
        outbound_name: str = "out",
        inbound_name: str = "in",
    ) -> None:
        self.index = index
        self.plain = plain
        self.cipher = cipher
        self.sealer = sealer
        self.opener = opener
        self.max_plaintext = max_plaintext
        self.on_failure = on_failure
        self.on_done = on_done
        self.stats = StreamStats()
        self._failed = threading.Event()
        self._lock = threading.Lock()
        self._names = (outbound_name, inbound_name)
        self._threads = [
            threading.Thread(target=self._outbound, name=f"tm-s{index}-out", daemon=True),
            threading.Thread(target=self._inbound, name=f"tm-s{index}-in", daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout)

    @property
    def done(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def close(self) -> None:
        for s in (self.plain, self.cipher):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _fail(self, direction: str, exc: BaseException, record: int | None) -> None:
        with self._lock:
            first = not self._failed.is_set()
            self._failed.set()
        if isinstance(exc, ChannelError):
            record = exc.record if exc.record is not None else record
            reason = exc.reason if hasattr(exc, "reason") else str(exc)
        else:
            reason = f"{type(exc).__name__}: {exc}"
        failure = StreamFailure(self.index, record, direction, reason)
        self.stats.errors.append(failure)
        self.close()
        if first:
            self.on_failure(failure)

    def _outbound(self) -> None:
        buf = bytearray(self.max_plaintext)
        out = bytearray(self.max_plaintext + SLACK)
        view, oview = memoryview(buf), memoryview(out)
        try:
            while True:
                n = self.plain.recv_into(buf)
                if n == 0:
                    self.cipher.sendall(self.sealer.end_of_stream())
                    with contextlib.suppress(OSError):
                        self.cipher.shutdown(socket.SHUT_WR)
                    self.stats.finished_out = True
                    break
                if self.stats.first_byte_at is None:
                    self.stats.first_byte_at = time.monotonic()
                m = self.sealer.seal_into(view[:n], oview)
                self.cipher.sendall(oview[:m])
                self.stats.bytes_out += n
                self.stats.records_out += 1
        except BaseException as e:  # noqa: BLE001 - every failure must close both ends
            if not self._failed.is_set():
                self._fail(self._names[0], e, self.sealer.records_sent)
        finally:
            self._finish()

    def _inbound(self) -> None:
        """Read ciphertext in large chunks and open every whole record found in the buffer.

        One ``recv_into`` usually brings several records (or a large part of one), instead of a
        header read plus one or more body reads per record: fewer system calls on the side that
        also has to decrypt. Only a partial record at the end of the buffer is ever moved.
        """
        hsize = self.opener.HEADER_SIZE
        record_max = hsize + self.max_plaintext + SLACK
        buf = bytearray(max(4 * record_max, INBOUND_BUFFER))
        plain = bytearray(self.max_plaintext + SLACK)
        view, pview = memoryview(buf), memoryview(plain)
        start = end = 0
        record = 0

        def fill(need: int) -> bool:
            """At least ``need`` unread bytes in the buffer; False on EOF at a record boundary."""
            nonlocal start, end
            if len(buf) - start < need:
                view[: end - start] = view[start:end]
                end -= start
                start = 0
            while end - start < need:
                n = self.cipher.recv_into(view[end:])
                if n == 0:
                    if end == start:
                        return False
                    raise ChannelError(
                        f"connection closed in the middle of a record ({end - start} bytes read)"
                    )
                end += n
            return True

        try:
            while True:
                if not fill(hsize):
                    self.opener.close()  # raises unless a verified end-of-stream was seen
                    break
                hview = view[start : start + hsize]
                need = self.opener.parse_header(hview)
                if hsize + need > record_max:
                    raise ChannelError(f"record body of {need} bytes exceeds the buffer")
                if need and not fill(hsize + need):
                    raise ChannelError("connection closed before the record body")
                hview = view[start : start + hsize]  # the buffer may have been compacted
                ev = self.opener.open_into(hview, view[start + hsize : start + hsize + need], pview)
                start += hsize + need
                record += 1
                if isinstance(ev, Data):
                    self.plain.sendall(pview[: ev.length])
                    self.stats.bytes_in += ev.length
                    self.stats.records_in += 1
                elif isinstance(ev, EndOfStream):
                    self.stats.finished_in = True
                    with contextlib.suppress(OSError):
                        self.plain.shutdown(socket.SHUT_WR)
                    # drain until the peer closes so the close after EOS is not an error
                    self.opener.close()
                    break
                elif isinstance(ev, Aborted):
                    raise ChannelError(f"peer aborted the stream: {ev.reason}")
                elif isinstance(ev, KeyUpdated):
                    continue
        except BaseException as e:  # noqa: BLE001
            if not self._failed.is_set():
                self._fail(self._names[1], e, record)
        finally:
            self._finish()

    def _finish(self) -> None:
        if self.done_both() and self.on_done and not self._failed.is_set():
            self.on_done(self.index)

    def done_both(self) -> bool:
        return self.stats.finished_in and self.stats.finished_out

    @property
    def failed(self) -> bool:
        return self._failed.is_set()
