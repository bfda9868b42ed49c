"""A migration's data path in its own process, so that it outlives the agent that started it.

The agent runs the handshake (it holds the host key and the TPM), then hands the relay the
authenticated TCP streams (``SCM_RIGHTS``) and only those streams' record keys. The relay pumps
QEMU's migration through them (:class:`trustmig.channel.relay.StreamPump`), reports failures and
the end of every stream to whichever agent is connected, and writes its final status to a file
(0600) so that an agent restarted after the relay exited still learns how the data path ended.

Source role: the relay listens on the unix socket QEMU migrates into and pairs QEMU's
connections, in arrival order, with the streams. Destination role: the relay connects each
stream to the incoming QEMU, stream 0 (QEMU's main channel) first.

A relay that was never configured exits when its first agent goes away (a spare whose agent
died); a configured one exits after its streams ended and the agent said ``close``, or after
``linger_s`` without an agent, or when nothing moved for ``linger_s`` while no agent was
connected (a data path nobody will ever use again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trustmig.channel.relay import (
    LATENCY_BUFFER_BYTES,
    StreamFailure,
    StreamPump,
    favour_latency,
)
from trustmig.channel.session import StreamKeys
from trustmig.relay import wire

log = logging.getLogger("trustmig.relay")
QEMU_CONNECT_TIMEOUT = 10.0


def _own_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _listen(path: Path, backlog: int) -> socket.socket:
    """A unix socket only its owner may connect to."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    os.chmod(path, 0o600)
    lsock.listen(backlog)
    return lsock


def keepalive(sock: socket.socket) -> None:
    """Notice a peer host that vanished without closing (a dead machine, a cut cable)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


class Relay:
    """The state of one relay process (threads: control, QEMU accept, two per stream)."""

    def __init__(self, control_path: Path, status_path: Path, linger_s: float = 600.0) -> None:
        self.control_path = control_path
        self.status_path = status_path
        self.linger_s = linger_s
        self.role = ""
        self.migration_id = ""
        self.qemu_path: Path | None = None
        #: streams that carry a disk (NBD) instead of QEMU's migration: index -> unix socket
        self.disk_paths: dict[int, Path] = {}
        self.keys: dict[int, StreamKeys] = {}
        self.n_streams = 0
        self.cipher_socks: dict[int, socket.socket] = {}
        self.pumps: dict[int, StreamPump] = {}
        self.failure: StreamFailure | None = None
        self.closing = False
        self.ended_at: float | None = None
        self._lock = threading.Lock()
        self._conn: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._qemu_listener: socket.socket | None = None
        self._stream0_connected = threading.Event()
        self._moved = (-1, time.monotonic())
        #: CPU seconds of this process when it was configured: what it spends after that is
        #: the data path's (a fresh interpreter's start-up is not)
        self._cpu_at_configure: float | None = None
        with contextlib.suppress(FileNotFoundError):
            control_path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(control_path))
        os.chmod(control_path, 0o600)
        self.listener.listen(4)
        self.listener.settimeout(1.0)

    # ------------------------------------------------------------------ status
    @property
    def configured(self) -> bool:
        return bool(self.role)

    def finished(self) -> bool:
        """Every stream ended (cleanly or not), or one failed."""
        if self.failure is not None:
            return True
        return (
            self.configured
            and len(self.pumps) == self.n_streams
            and all(p.done_both() for p in self.pumps.values())
        )

    def status(self) -> dict[str, Any]:
        cpu_s = _own_cpu_seconds()
        state = "idle"
        if self.configured:
            state = "running"
            if self.failure is not None:
                state = "failed"
            elif self.finished():
                state = "done"
        return {
            "pid": os.getpid(),
            "state": state,
            "role": self.role,
            "migration_id": self.migration_id,
            "streams": [self._stream_status(i, p) for i, p in sorted(self.pumps.items())],
            "failure": None if self.failure is None else self.failure.__dict__,
            "cpu_s": round(cpu_s, 3),
            "cpu_s_data": (
                None if self._cpu_at_configure is None else round(cpu_s - self._cpu_at_configure, 3)
            ),
        }

    @staticmethod
    def _stream_status(index: int, p: StreamPump) -> dict[str, Any]:
        s = p.stats
        return {
            "index": index,
            "bytes_out": s.bytes_out,
            "bytes_in": s.bytes_in,
            "records_out": s.records_out,
            "records_in": s.records_in,
            "first_byte_at": s.first_byte_at,
            "finished_out": s.finished_out,
            "finished_in": s.finished_in,
            "sealer_digest": p.sealer.digest.hex(),
        }

    def write_status(self) -> None:
        tmp = self.status_path.with_name(self.status_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.status(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.status_path)

    # ------------------------------------------------------------------ agent connection
    def emit(self, event: dict[str, Any]) -> None:
        with self._send_lock:
            if self._conn is None:
                return
            try:
                wire.send(self._conn, event)
            except wire.RelayWireError:
                self._conn = None

    def serve(self) -> None:
        """Serve agents until it is time to exit."""
        started = time.monotonic()
        while not self._should_exit(started):
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with self._send_lock:
                self._conn = conn
            self._serve_one(conn)
            with self._send_lock:
                self._conn = None
            with contextlib.suppress(OSError):
                conn.close()
            if not self.configured:
                break  # a spare whose agent went away: nothing to carry
        self.shutdown()

    def _should_exit(self, started: float) -> bool:
        now = time.monotonic()
        if self.closing:
            return True
        if not self.configured:
            return now - started > 60.0
        if self.ended_at is not None:
            return now - self.ended_at > self.linger_s
        return self._idle_without_agent(now)

    def _idle_without_agent(self, now: float) -> bool:
        moved = sum(p.stats.bytes_in + p.stats.bytes_out for p in list(self.pumps.values()))
        if moved != self._moved[0] or self._conn is not None:
            self._moved = (moved, now)
            return False
        return now - self._moved[1] > self.linger_s

    def _serve_one(self, conn: socket.socket) -> None:
        while not self.closing:
            try:
                msg, fds = wire.recv(conn)
            except wire.RelayWireError:
                return
            rid = msg.get("id")
            try:
                result = self._dispatch(msg, fds)
                reply: dict[str, Any] = {"id": rid, "ok": True, "result": result}
            except Exception as e:  # noqa: BLE001 - report to the agent, keep the data path
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                reply = {"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"}
            with self._send_lock:
                try:
                    wire.send(conn, reply)
                except wire.RelayWireError:
                    return

    def _dispatch(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "configure":
            return self._configure(msg)
        if op == "stream":
            if len(fds) != 1:
                raise ValueError("a stream message carries exactly one descriptor")
            return self._add_stream(int(msg["index"]), fds[0])
        if op == "status":
            return self.status()
        if op == "latency":
            return self._favour_latency([int(i) for i in msg.get("streams", [0])])
        if op == "close":
            self.closing = True
            return {"closing": True}
        raise ValueError(f"unknown relay operation {op!r}")

    # ------------------------------------------------------------------ set-up
    def _configure(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.configured:
            raise ValueError("relay already configured")
        role = str(msg["role"])
        if role not in ("source", "destination"):
            raise ValueError(f"role must be source or destination, not {role!r}")
        keys = [StreamKeys.from_wire(k) for k in msg["keys"]]
        self.keys = {k.stream: k for k in keys}
        self.n_streams = len(keys)
        if sorted(self.keys) != list(range(self.n_streams)):
            raise ValueError("stream keys must cover streams 0..n-1")
        self.qemu_path = Path(str(msg["qemu_socket"]))
        self.migration_id = str(msg.get("migration_id", ""))
        self.disk_paths = {int(i): Path(str(p)) for i, p in (msg.get("disk_sockets") or {}).items()}
        if not set(self.disk_paths) <= set(self.keys) or 0 in self.disk_paths:
            raise ValueError("disk streams must be streams 1..n-1")
        if role == "source":
            lsock = _listen(self.qemu_path, self.n_streams + 1)
            self._qemu_listener = lsock
            threading.Thread(target=self._accept_qemu, name="tm-qemu-accept", daemon=True).start()
            for index, path in self.disk_paths.items():
                threading.Thread(target=self._accept_disk, args=(index, _listen(path, 1)),
                                 name=f"tm-disk-{index}", daemon=True).start()  # fmt: skip
        self.role = role
        self._cpu_at_configure = _own_cpu_seconds()
        return {"listening": str(self.qemu_path) if role == "source" else None}

    def _favour_latency(self, streams: list[int]) -> dict[str, Any]:
        """The post-copy switch: requested pages must not wait behind megabytes of bulk."""
        with self._lock:
            socks = [(i, self.cipher_socks[i]) for i in streams if i in self.cipher_socks]
        for _, sock in socks:
            favour_latency(sock)
        return {"streams": [i for i, _ in socks], "buffer_bytes": LATENCY_BUFFER_BYTES}

    def _add_stream(self, index: int, fd: int) -> dict[str, Any]:
        if not self.configured:
            os.close(fd)
            raise ValueError("configure the relay before adding streams")
        sock = socket.socket(fileno=fd)
        if index not in self.keys or index in self.cipher_socks:
            sock.close()
            raise ValueError(f"stream {index} is unknown or already added")
        sock.settimeout(None)
        keepalive(sock)
        with self._lock:
            self.cipher_socks[index] = sock
        if self.role == "destination":
            target = self._connect_disk if index in self.disk_paths else self._connect_qemu
            threading.Thread(
                target=target, args=(index,), name=f"tm-qemu-{index}", daemon=True
            ).start()
        return {"stream": index}

    # ------------------------------------------------------------------ pumping
    def _accept_qemu(self) -> None:
        """Source: QEMU's i-th connection is carried by stream i."""
        assert self._qemu_listener is not None
        self._qemu_listener.settimeout(0.5)
        index = 0
        migration_streams = self.n_streams - len(self.disk_paths)
        while index < migration_streams and not self.closing and self.failure is None:
            try:
                conn, _ = self._qemu_listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._pair(index, conn, "QEMU", "source→destination",
                              "destination→source (return path)"):  # fmt: skip
                return
            index += 1
        with contextlib.suppress(OSError):
            self._qemu_listener.close()

    def _pair(self, index: int, conn: socket.socket, what: str, out_name: str,
              in_name: str) -> bool:  # fmt: skip
        """Source: pump a local connection through channel stream ``index`` once the agent
        handed that stream over; False (a failure reported) if it never came."""
        conn.settimeout(None)
        deadline = time.monotonic() + QEMU_CONNECT_TIMEOUT
        while index not in self.cipher_socks and time.monotonic() < deadline:
            time.sleep(0.005)
        if index not in self.cipher_socks:
            conn.close()
            self._on_failure(StreamFailure(index, None, "setup", f"no channel stream for {what}"))
            return False
        self._start_pump(index, conn, out_name, in_name)
        return True

    def _accept_disk(self, index: int, lsock: socket.socket) -> None:
        """Source: the one NBD client connection of a disk is carried by its stream."""
        lsock.settimeout(0.5)
        try:
            while not self.closing and self.failure is None:
                try:
                    conn, _ = lsock.accept()
                except TimeoutError:
                    continue
                self._pair(index, conn, "a disk", "source→destination (disk)",
                           "destination→source (disk)")  # fmt: skip
                return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                lsock.close()

    def _connect_disk(self, index: int) -> None:
        """Destination: a disk stream goes to the incoming QEMU's NBD server."""
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(QEMU_CONNECT_TIMEOUT)
            s.connect(str(self.disk_paths[index]))
            s.settimeout(None)
        except OSError as e:
            self._on_failure(StreamFailure(index, None, "setup", f"incoming QEMU's disks: {e}"))
            return
        self._start_pump(index, s, "destination→source (disk)", "source→destination (disk)")

    def _connect_qemu(self, index: int) -> None:
        """Destination: connect the stream to the incoming QEMU, the main channel first."""
        if index != 0 and not self._stream0_connected.wait(QEMU_CONNECT_TIMEOUT):
            self._on_failure(StreamFailure(index, None, "setup", "stream 0 never reached QEMU"))
            return
        assert self.qemu_path is not None
        with self._lock:  # QEMU takes its connections in the order they arrive
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(QEMU_CONNECT_TIMEOUT)
                s.connect(str(self.qemu_path))
                s.settimeout(None)
            except OSError as e:
                self._on_failure(StreamFailure(index, None, "setup", f"incoming QEMU: {e}"))
                return
            self._start_pump(index, s, "destination→source (return path)", "source→destination")
        if index == 0:
            self._stream0_connected.set()

    def _start_pump(self, index: int, plain: socket.socket, out_name: str, in_name: str) -> None:
        keys = self.keys[index]
        pump = StreamPump(
            index,
            plain,
            self.cipher_socks[index],
            keys.sealer(),
            keys.opener(),
            max_plaintext=keys.limits.max_plaintext,
            on_failure=self._on_failure,
            on_done=self._on_stream_done,
            outbound_name=out_name,
            inbound_name=in_name,
        )
        self.pumps[index] = pump
        pump.start()
        self.emit({"event": "stream-started", "index": index})

    def _on_failure(self, failure: StreamFailure) -> None:
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = failure
        if not first:
            return
        for p in list(self.pumps.values()):
            p.close()
        for s in list(self.cipher_socks.values()):
            with contextlib.suppress(OSError):
                s.close()
        self._ended()
        self.emit({"event": "failure", "failure": failure.__dict__})

    def _on_stream_done(self, index: int) -> None:
        self.emit({"event": "stream-done", "index": index})
        if self.finished():
            self._ended()
            self.emit({"event": "done", "status": self.status()})

    def _ended(self) -> None:
        if self.ended_at is None:
            self.ended_at = time.monotonic()
            with contextlib.suppress(OSError):
                self.write_status()

    def shutdown(self) -> None:
        for p in list(self.pumps.values()):
            if not p.done:
                p.close()
        for s in list(self.cipher_socks.values()):
            with contextlib.suppress(OSError):
                s.close()
        with contextlib.suppress(OSError):
            self.write_status()
        with contextlib.suppress(OSError):
            self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()
        if self.role == "source" and self.qemu_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.qemu_path.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trustmig.relay")
    ap.add_argument("--control", required=True, type=Path)
    ap.add_argument("--status", required=True, type=Path)
    ap.add_argument("--linger", type=float, default=600.0)
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s trustmig.relay: %(message)s"
    )
    relay = Relay(args.control, args.status, args.linger)
    print("ready", flush=True)
    relay.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
