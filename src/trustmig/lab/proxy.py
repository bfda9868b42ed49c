"""A man in the middle on the migration path (loopback only), for the attack lab and tests.

Traffic is routed through it by pointing a destination's *advertised* data address (or QEMU's
migration URI) at the proxy. Each accepted connection is relayed to the real target by two
threads; the source→destination direction passes through a :class:`Tap`, which may observe
(eavesdrop, record), rewrite (Xensploit-style), flip bits or cut the stream.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field


class Tap:
    """Sees source→destination bytes; returns what to forward, or None to cut the connection."""

    def on_data(self, conn_index: int, offset: int, data: bytes) -> bytes | None:
        return data


@dataclass
class Sniffer(Tap):
    """Counts occurrences of a needle across chunk boundaries and keeps a bounded recording."""

    needle: bytes
    record_limit: int = 0
    hits: int = 0
    bytes_seen: int = 0
    recordings: dict[int, bytearray] = field(default_factory=dict)
    _tails: dict[int, bytes] = field(default_factory=dict)

    def on_data(self, conn_index: int, offset: int, data: bytes) -> bytes | None:
        window = self._tails.get(conn_index, b"") + data
        self.hits += window.count(self.needle)
        keep = len(self.needle) - 1
        self._tails[conn_index] = window[-keep:] if keep else b""
        self.bytes_seen += len(data)
        if self.record_limit:
            rec = self.recordings.setdefault(conn_index, bytearray())
            room = self.record_limit - len(rec)
            if room > 0:
                rec += data[:room]
        return data


@dataclass
class Rewriter(Tap):
    """Replaces every occurrence of ``old`` with ``new`` (same length) in flight."""

    old: bytes
    new: bytes
    replaced: int = 0

    def __post_init__(self) -> None:
        if len(self.old) != len(self.new):
            raise ValueError("rewriter needs same-length patterns")

    def on_data(self, conn_index: int, offset: int, data: bytes) -> bytes | None:
        n = data.count(self.old)
        if n:
            self.replaced += n
            data = data.replace(self.old, self.new)
        return data


@dataclass
class BitFlipper(Tap):
    """Flips one bit at an absolute offset of one connection's stream."""

    at_offset: int
    conn_index: int = 0
    flipped: bool = False

    def on_data(self, conn_index: int, offset: int, data: bytes) -> bytes | None:
        if conn_index == self.conn_index and offset <= self.at_offset < offset + len(data):
            b = bytearray(data)
            b[self.at_offset - offset] ^= 0x01
            self.flipped = True
            return bytes(b)
        return data


@dataclass
class Cutter(Tap):
    """Cuts a connection once it has carried ``after_bytes``.

    A cutter made with ``armed=False`` forwards everything until :meth:`arm` is called and
    then cuts ``after_bytes`` later: a cut "after the post-copy switch" must not depend on how
    fast the switch came on a loaded machine.
    """

    after_bytes: int
    conn_index: int = 0
    armed: bool = True
    cut: bool = False
    _base: int | None = 0

    def __post_init__(self) -> None:
        if not self.armed:
            self._base = None

    def arm(self) -> None:
        """Count ``after_bytes`` from the next chunk on (called from another thread)."""
        self.armed = True

    def on_data(self, conn_index: int, offset: int, data: bytes) -> bytes | None:
        if conn_index != self.conn_index or not self.armed:
            return data
        if self._base is None:
            self._base = offset
        if offset + len(data) - self._base >= self.after_bytes:
            self.cut = True
            return None
        return data


class MitmProxy:
    """TCP relay on 127.0.0.1 with a tap on the client→server direction."""

    def __init__(
        self,
        target: tuple[str, int],
        tap: Tap | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        *,
        lab_network: bool = False,
    ) -> None:
        """``lab_network``: the target may also be an address of the namespaced lab
        (10.77.0.0/16), for a proxy created inside one of its namespaces."""
        if not (target[0].startswith("127.") or (lab_network and target[0].startswith("10.77."))):
            raise ValueError("the lab proxy only relays to loopback or the namespaced lab")
        self.target = target
        self.tap = tap or Tap()
        self.sock = socket.create_server(listen)
        self.address = self.sock.getsockname()[:2]
        self.connections = 0
        self._tap_base = 0
        self._stop = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def set_tap(self, tap: Tap | None) -> None:
        """Use ``tap`` for connections accepted from now on, numbered again from 0."""
        with self._lock:
            self.tap = tap or Tap()
            self._tap_base = self.connections

    @property
    def hostport(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def __enter__(self) -> MitmProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, timeout=5)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            with self._lock:
                idx = self.connections
                self.connections += 1
                self._socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u, idx, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, idx, False), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, idx: int, tapped: bool) -> None:
        offset = 0
        try:
            while True:
                data = a.recv(262144)
                if not data:
                    with contextlib.suppress(OSError):
                        b.shutdown(socket.SHUT_WR)
                    return
                if tapped:
                    out = self.tap.on_data(idx - self._tap_base, offset, data)
                    offset += len(data)
                    if out is None:
                        break
                    data = out
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@dataclass
class BlindTamper(Tap):
    """Rewrites a known pattern where it appears and, failing that, overwrites ``span`` bytes
    at ``at_offset`` of one connection: what a Xensploit-style attacker does when the memory it
    wants to change is not recognisable on the wire."""

    old: bytes
    new: bytes
    at_offset: int
    span: int = 64
    conn_index: int = 0
    replaced: int = 0
    tampered: int = 0

    def on_data(self, conn_index: int, offset: int, data: bytes) -> bytes | None:
        n = data.count(self.old)
        if n:
            self.replaced += n
            data = data.replace(self.old, self.new)
        end = offset + len(data)
        if conn_index == self.conn_index and offset < self.at_offset + self.span and \
                end > self.at_offset:  # fmt: skip
            b = bytearray(data)
            lo = max(self.at_offset, offset) - offset
            hi = min(self.at_offset + self.span, end) - offset
            for i in range(lo, hi):
                b[i] ^= 0x5A
            self.tampered += hi - lo
            data = bytes(b)
        return data


@dataclass
class Chain(Tap):
    """Several taps in a row (e.g. record what passes, then cut)."""

    taps: list[Tap]

    def on_data(self, conn_index: int, offset: int, data: bytes) -> bytes | None:
        out: bytes | None = data
        for t in self.taps:
            if out is None:
                return None
            out = t.on_data(conn_index, offset, out)
        return out
