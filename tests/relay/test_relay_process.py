"""Relay processes carry a stream between two unix sockets through sealed TCP, on their own.

Two real relay processes (source and destination roles) move bytes from a "QEMU" unix socket
on one side to a "QEMU" listener on the other, with the record keys of a real session. The
agent's handle is dropped in the middle and re-attached: the data path does not notice.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from trustmig.channel.session import SessionKeys
from trustmig.relay.client import RelayError, RelayHandle, RelayRecord, read_status, spawn

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[tuple[RelayRecord, RelayRecord]]:
    src = spawn(tmp_path / "src", tmp_path / "src.log", linger_s=30)
    dst = spawn(tmp_path / "dst", tmp_path / "dst.log", linger_s=30)
    yield src, dst
    for r in (src, dst):
        r.process.kill()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    return a, b


def _wait(pred, timeout: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _set_up(
    tmp_path: Path, relays: tuple[RelayRecord, RelayRecord], keys: SessionKeys
) -> tuple[RelayHandle, RelayHandle, socket.socket, Path]:
    src_rec, dst_rec = relays
    qemu_in = tmp_path / "incoming.sock"
    incoming = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    incoming.bind(str(qemu_in))
    incoming.listen(1)
    src, dst = RelayHandle(src_rec), RelayHandle(dst_rec)
    src.connect()
    dst.connect()
    a, b = _tcp_pair()
    dst.configure("destination", [keys.stream_keys(0, "s2c", "c2s")], qemu_in, "m1")
    res = src.configure("source", [keys.stream_keys(0, "c2s", "s2c")], tmp_path / "out.sock", "m1")
    assert res["listening"] == str(tmp_path / "out.sock")
    src.add_stream(0, a)
    dst.add_stream(0, b)
    return src, dst, incoming, tmp_path / "out.sock"


def _carry_in_two_halves(
    incoming: socket.socket, out_path: Path, between: Callable[[], None]
) -> bytearray:
    """ "QEMU" sends PAYLOAD through the relays in two halves with ``between()`` run in the
    middle of the stream; returns what the destination "QEMU" received."""
    received = bytearray()

    def qemu_destination() -> None:
        conn, _ = incoming.accept()
        while chunk := conn.recv(65536):
            received.extend(chunk)
        conn.close()

    t = threading.Thread(target=qemu_destination)
    t.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qemu_source:
        qemu_source.connect(str(out_path))
        qemu_source.sendall(PAYLOAD[: len(PAYLOAD) // 2])
        between()
        qemu_source.sendall(PAYLOAD[len(PAYLOAD) // 2 :])
        qemu_source.shutdown(socket.SHUT_WR)
        t.join(20)
    return received


def test_stream_crosses_two_relays_and_survives_the_agent_going_away(
    tmp_path: Path, relays: tuple[RelayRecord, RelayRecord]
) -> None:
    keys = SessionKeys(master_secret=os.urandom(32), cipher="aes-256-gcm", n_streams=1)
    src, dst, incoming, out_path = _set_up(tmp_path, relays, keys)

    src2, dst2 = RelayHandle(relays[0]), RelayHandle(relays[1])

    def agent_replaced() -> None:
        # the agent disconnects (as if killed) and a new one attaches in the middle of the stream
        src.close(stop=False)
        dst.close(stop=False)
        src2.connect()
        dst2.connect()

    received = _carry_in_two_halves(incoming, out_path, agent_replaced)
    assert hashlib.sha256(received).digest() == hashlib.sha256(PAYLOAD).digest()
    assert _wait(lambda: src2.status()["state"] == "done")
    st = src2.status()
    assert st["streams"][0]["bytes_out"] == len(PAYLOAD) and st["failure"] is None
    assert st["cpu_s"] >= 0
    src2.close()
    dst2.close()
    assert not relays[0].process.alive()
    assert read_status(relays[0])["state"] == "done", "the status outlives the relay"


def test_tampered_record_fails_the_stream_on_the_destination(
    tmp_path: Path, relays: tuple[RelayRecord, RelayRecord]
) -> None:
    keys = SessionKeys(master_secret=os.urandom(32), cipher="aes-256-gcm", n_streams=1)
    wrong = SessionKeys(master_secret=os.urandom(32), cipher="aes-256-gcm", n_streams=1)
    src_rec, dst_rec = relays
    qemu_in = tmp_path / "incoming.sock"
    incoming = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    incoming.bind(str(qemu_in))
    incoming.listen(1)
    events: list[dict] = []
    src, dst = RelayHandle(src_rec), RelayHandle(dst_rec, on_event=events.append)
    src.connect()
    dst.connect()
    a, b = _tcp_pair()
    dst.configure("destination", [wrong.stream_keys(0, "s2c", "c2s")], qemu_in, "m1")
    src.configure("source", [keys.stream_keys(0, "c2s", "s2c")], tmp_path / "out.sock", "m1")
    src.add_stream(0, a)
    dst.add_stream(0, b)
    qs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qs.connect(str(tmp_path / "out.sock"))
    qs.sendall(b"x" * 100_000)
    assert _wait(lambda: dst.status()["state"] == "failed")
    # the push comes on the control socket's reader thread, a moment after the status
    assert _wait(lambda: any(e.get("event") == "failure" for e in events))
    failure = dst.status()["failure"]
    assert failure["direction"] == "source→destination"
    qs.close()
    src.close()
    dst.close()


def test_spare_relay_exits_when_its_agent_goes_away(tmp_path: Path) -> None:
    rec = spawn(tmp_path / "spare", tmp_path / "spare.log")
    h = RelayHandle(rec)
    h.connect()
    assert h.status()["state"] == "idle"
    h.close(stop=False)
    assert rec.process.wait_gone(10), "an unconfigured relay must not linger"


def test_relay_refuses_streams_it_has_no_keys_for(tmp_path: Path) -> None:
    rec = spawn(tmp_path / "r", tmp_path / "r.log")
    h = RelayHandle(rec)
    h.connect()
    try:
        from trustmig.relay.client import RelayError

        a, b = _tcp_pair()
        with pytest.raises(RelayError, match="configure the relay"):
            h.add_stream(0, a)
        b.close()
    finally:
        h.close()


def test_a_disk_stream_goes_from_its_own_socket_to_the_nbd_server_both_ways(
    tmp_path: Path, relays: tuple[RelayRecord, RelayRecord]
) -> None:
    """Stream 1 carries a disk: the source relay listens on the disk's socket, the destination
    relay connects to the NBD server's; requests go one way and replies the other."""
    keys = SessionKeys(master_secret=os.urandom(32), cipher="aes-256-gcm", n_streams=2)
    src_rec, dst_rec = relays
    qemu_in, nbd = tmp_path / "incoming.sock", tmp_path / "nbd.sock"
    listeners = []
    for path in (qemu_in, nbd):
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(str(path))
        ls.listen(1)
        listeners.append(ls)
    src, dst = RelayHandle(src_rec), RelayHandle(dst_rec)
    src.connect()
    dst.connect()
    pairs = [_tcp_pair(), _tcp_pair()]
    disk_out = tmp_path / "disk-data.sock"
    dst.configure("destination", [keys.stream_keys(i, "s2c", "c2s") for i in range(2)], qemu_in,
                  "m1", {1: nbd})  # fmt: skip
    src.configure("source", [keys.stream_keys(i, "c2s", "s2c") for i in range(2)],
                  tmp_path / "out.sock", "m1", {1: disk_out})  # fmt: skip
    for i, (a, b) in enumerate(pairs):
        src.add_stream(i, a)
        dst.add_stream(i, b)
    # the "NBD client" of the source QEMU, and the "NBD server" of the destination QEMU
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    assert _wait(lambda: disk_out.exists())
    client.connect(str(disk_out))
    server, _ = listeners[1].accept()
    client.sendall(b"read 4096 at 0")
    assert server.recv(64) == b"read 4096 at 0"
    server.sendall(PAYLOAD[:4096])
    got = bytearray()
    while len(got) < 4096:
        got += client.recv(65536)
    assert bytes(got) == PAYLOAD[:4096]
    st = src.status()
    assert {s["index"] for s in st["streams"]} == {1} and st["failure"] is None
    for s in (client, server, *listeners):
        s.close()
    src.close()
    dst.close()


def test_a_disk_stream_cannot_replace_the_migration_stream(
    tmp_path: Path, relays: tuple[RelayRecord, RelayRecord]
) -> None:
    keys = SessionKeys(master_secret=os.urandom(32), cipher="aes-256-gcm", n_streams=2)
    src = RelayHandle(relays[0])
    src.connect()
    with pytest.raises(RelayError, match=r"disk streams must be streams 1\.\.n-1"):
        src.configure("source", [keys.stream_keys(i, "c2s", "s2c") for i in range(2)],
                      tmp_path / "out.sock", "m1", {0: tmp_path / "d.sock"})  # fmt: skip
    src.close()


def test_the_post_copy_switch_shrinks_a_live_streams_buffers_and_loses_nothing(
    tmp_path: Path, relays: tuple[RelayRecord, RelayRecord]
) -> None:
    keys = SessionKeys(master_secret=os.urandom(32), cipher="aes-256-gcm", n_streams=1)
    src, dst, incoming, out_path = _set_up(tmp_path, relays, keys)

    def post_copy_switch() -> None:
        for side in (src, dst):
            assert side.favour_latency() == {"streams": [0], "buffer_bytes": 256 * 1024}
            assert side.favour_latency((7,))["streams"] == []  # no such stream: nothing to do

    received = _carry_in_two_halves(incoming, out_path, post_copy_switch)
    assert hashlib.sha256(received).digest() == hashlib.sha256(PAYLOAD).digest()
    src.close()
    dst.close()
