"""The agent's handle on a relay process: spawn or re-attach, hand over streams, read status.

Calls block (they are short local exchanges); the agent runs them in a worker thread. Events
the relay pushes (a stream failed, every stream ended) are passed to ``on_event`` from the
reader thread: the agent's callback hands them to its event loop.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmig.channel.session import StreamKeys
from trustmig.proc import ProcessRef
from trustmig.relay import wire

EventCallback = Callable[[dict[str, Any]], None]
START_TIMEOUT = 20.0


class RelayError(Exception):
    """The relay could not be started, reached or told something (one line)."""


@dataclass(frozen=True)
class RelayRecord:
    """What the journal keeps of a relay to find it again after an agent restart."""

    process: ProcessRef
    control: Path
    status: Path

    def to_json(self) -> dict[str, Any]:
        return {"process": self.process.to_json(), "control": str(self.control),
                "status": str(self.status)}  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RelayRecord:
        proc = ProcessRef.from_json(doc["process"])
        assert proc is not None
        return cls(proc, Path(doc["control"]), Path(doc["status"]))


def spawn(sock_dir: Path, log_path: Path, *, linger_s: float = 600.0) -> RelayRecord:
    """Start a relay process that outlives its agent (own session, no death signal)."""
    sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    control = sock_dir / "relay.sock"
    status = sock_dir.parent / f"{sock_dir.name}.relay-status.json"
    logf = log_path.open("ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trustmig.relay", "--control", str(control),
             "--status", str(status), "--linger", str(linger_s)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    finally:
        logf.close()
    assert proc.stdout is not None
    line = _read_line(proc.stdout, START_TIMEOUT)
    proc.stdout.close()
    if line.strip() != b"ready":
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise RelayError(f"relay process did not start (see {log_path})")
    # the agent does not wait for it: a relay must be able to outlive the agent process
    _detach(proc)
    return RelayRecord(ProcessRef.of(proc.pid), control, status)


def _read_line(stream: Any, timeout: float) -> bytes:
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else b""


def _detach(proc: subprocess.Popen[bytes]) -> None:
    """Reap the child when it exits, without keeping the agent tied to it."""

    def reap() -> None:
        with contextlib.suppress(Exception):
            proc.wait()

    threading.Thread(target=reap, name=f"tm-reap-{proc.pid}", daemon=True).start()


class RelayHandle:
    """A connection to one relay process."""

    def __init__(self, record: RelayRecord, on_event: EventCallback | None = None) -> None:
        self.record = record
        self.on_event = on_event
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self.closed = threading.Event()

    @property
    def pid(self) -> int:
        return self.record.process.pid

    def alive(self) -> bool:
        return self.record.process.alive()

    def connect(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(str(self.record.control))
                break
            except OSError as e:
                s.close()
                if time.monotonic() > deadline or not self.alive():
                    raise RelayError(f"relay {self.pid} unreachable: {e}") from None
                time.sleep(0.02)
        self._sock = s
        self.closed.clear()
        self._reader = threading.Thread(target=self._read, name="tm-relay-ctl", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._sock is not None
        try:
            while True:
                msg, fds = wire.recv(self._sock)
                for fd in fds:
                    os.close(fd)
                if "event" in msg:
                    if self.on_event is not None:
                        self.on_event(msg)
                    continue
                rid = msg.get("id")
                with self._lock:
                    slot = self._replies.get(rid) if isinstance(rid, int) else None
                if slot is not None:
                    slot[1].append(msg)
                    slot[0].set()
        except wire.RelayWireError:
            pass
        finally:
            self.closed.set()
            with self._lock:
                for ev, _ in self._replies.values():
                    ev.set()
            if self.on_event is not None:
                self.on_event({"event": "disconnected"})

    def call(
        self, op: str, params: dict[str, Any] | None = None, *, fd: int | None = None,
        timeout: float = 10.0,
    ) -> dict[str, Any]:  # fmt: skip
        if self._sock is None or self.closed.is_set():
            raise RelayError(f"relay {self.pid} is not connected")
        rid = next(self._ids)
        done = threading.Event()
        box: list[dict[str, Any]] = []
        with self._lock:
            self._replies[rid] = (done, box)
        try:
            wire.send(self._sock, {"op": op, "id": rid, **(params or {})},
                      [fd] if fd is not None else None)  # fmt: skip
            if not done.wait(timeout) or not box:
                raise RelayError(f"relay {self.pid}: no answer to {op}")
        except wire.RelayWireError as e:
            raise RelayError(f"relay {self.pid}: {e}") from None
        finally:
            with self._lock:
                self._replies.pop(rid, None)
        reply = box[0]
        if not reply.get("ok"):
            raise RelayError(f"relay {self.pid} refused {op}: {reply.get('error')}")
        result = reply.get("result") or {}
        return result if isinstance(result, dict) else {}

    def configure(
        self,
        role: str,
        keys: list[StreamKeys],
        qemu_socket: Path,
        migration_id: str,
        disk_sockets: dict[int, Path] | None = None,
    ) -> dict[str, Any]:
        """``disk_sockets``: streams that carry a disk, and the unix socket of each (the
        source listens there for QEMU's NBD client; the destination connects there)."""
        return self.call(
            "configure",
            {
                "role": role,
                "keys": [k.to_wire() for k in keys],
                "qemu_socket": str(qemu_socket),
                "migration_id": migration_id,
                "disk_sockets": {str(i): str(p) for i, p in (disk_sockets or {}).items()},
            },
        )

    def add_stream(self, index: int, sock: socket.socket) -> None:
        """Hand an authenticated stream to the relay; the agent's copy is closed."""
        try:
            self.call("stream", {"index": index}, fd=sock.fileno())
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def favour_latency(self, streams: tuple[int, ...] = (0,)) -> dict[str, Any]:
        """Shrink the socket buffers of ``streams`` (post-copy: page requests before bulk);
        raises RelayError if the relay cannot be asked."""
        return self.call("latency", {"streams": list(streams)})

    def status(self) -> dict[str, Any]:
        """The relay's live status, or the status file it wrote before it exited."""
        if self._sock is not None and not self.closed.is_set():
            with contextlib.suppress(RelayError):
                return self.call("status", timeout=5.0)
        return read_status(self.record)

    def close(self, *, stop: bool = True) -> None:
        """Disconnect; with ``stop`` the relay shuts its streams and exits."""
        if stop and self._sock is not None and not self.closed.is_set():
            with contextlib.suppress(RelayError):
                self.call("close", timeout=3.0)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._sock.close()
        if stop and not self.record.process.wait_gone(3.0):
            self.record.process.kill()


def read_status(record: RelayRecord) -> dict[str, Any]:
    """What the relay last wrote of itself; ``state`` is ``gone`` if it never wrote."""
    try:
        doc = json.loads(record.status.read_text())
        if isinstance(doc, dict):
            return doc
    except (OSError, ValueError):
        pass
    alive = record.process.alive()
    return {"state": "unknown" if alive else "gone", "streams": [], "failure": None}
