"""The flood generator against real guarded listeners on 127.0.0.1 (TLS 1.3 and plain TCP).

Every assertion is about socket-level outcomes the generator observed and rule hits the guard
counted; timings are only checked against generous caps because the machine is shared.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from guard.tls_helpers import self_signed  # tests/ is on sys.path (rootdir of the test packages)
from trustmig.agent.protocol import encode
from trustmig.guard import Guard, GuardRules
from trustmig.guard.aio import guarded_serve, stop_guarded
from trustmig.lab.flood import (
    Flood,
    FloodReport,
    FloodSpec,
    KindReport,
    RssSampler,
    peak_rss_kib,
    rss_kib,
)

pytestmark = pytest.mark.timeout(30)

#: Rules under which a small flood is admitted (to observe per-kind outcomes).
LENIENT: dict[str, Any] = dict(
    max_conn_rate_per_peer=10_000.0,
    max_half_open=200,
    max_half_open_per_peer=200,
    max_sessions=200,
    max_sessions_per_peer=200,
)


# ------------------------------------------------------------------------------ servers


@pytest.fixture()
def server_ctx(tmp_path: Path) -> ssl.SSLContext:
    """TLS 1.3 server context that requires a client certificate signed by 'host-b'."""
    s_cert, s_key = self_signed(tmp_path, "host-a")
    c_cert, _ = self_signed(tmp_path, "host-b")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(s_cert, s_key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(c_cert)
    return ctx


async def reply_error(r: asyncio.StreamReader, w: asyncio.StreamWriter, cid: int) -> None:
    """Like an agent that rejects a malformed first frame: one error frame, then close."""
    await r.read(5)
    w.write(encode({"id": 0, "ok": False, "error": "bad handshake frame"}))
    await w.drain()
    w.close()


@dataclass
class ServerThread:
    """A guarded_serve listener on 127.0.0.1 in its own thread and event loop."""

    guard: Guard
    ssl_ctx: ssl.SSLContext | None
    handshake_timeout: float = 10.0

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "server did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            guarded_serve(
                self.guard,
                "control",
                "127.0.0.1",
                0,
                reply_error,
                ssl_ctx=self.ssl_ctx,
                handshake_timeout=self.handshake_timeout,
            )
        )
        self.port: int = self.server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(stop_guarded(self.server))
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture()
def start_server() -> Iterator[type[ServerThread]]:
    started: list[ServerThread] = []

    class _Tracked(ServerThread):
        def __post_init__(self) -> None:
            super().__post_init__()
            started.append(self)

    yield _Tracked
    for srv in started:
        srv.stop()


def run_flood(spec: FloodSpec, timeout: float = 20.0) -> FloodReport:
    with Flood(spec) as flood:
        assert flood.wait(timeout), "flood did not end by itself"
    report = flood.report()
    assert not report.running
    assert report.open_now == 0
    for kind, stats in report.kinds.items():
        assert stats.outcomes_total() == stats.attempted, (kind, stats)
    return report


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_until(pred: object, timeout: float = 10.0) -> bool:
    assert callable(pred)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


# ------------------------------------------------------------------------------ spec
@pytest.mark.parametrize(
    "host", ["10.0.0.1", "8.8.8.8", "0.0.0.0", "::", "fe80::1", "::ffff:10.0.0.1", "localhost"]
)
def test_spec_refuses_non_loopback_targets(host: str) -> None:
    with pytest.raises(ValueError) as err:
        FloodSpec(targets=[("127.0.0.1", 1), (host, 9)])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1"])
def test_spec_accepts_loopback_targets(host: str) -> None:
    FloodSpec(targets=[(host, 9)])


@pytest.mark.parametrize(
    "bad",
    [
        {"kinds": ("smurf",)},
        {"kinds": ()},
        {"rate_per_s": 0},
        {"max_attempts": 0},
        {"duration_s": float("inf")},
        {"max_open": 100_000},
        {"targets": []},
        {"targets": [("127.0.0.1", 0)]},
    ],
)
def test_spec_refuses_bad_values(bad: dict[str, object]) -> None:
    args: dict[str, object] = {"targets": [("127.0.0.1", 9)], **bad}
    with pytest.raises(ValueError):
        FloodSpec(**args)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ kinds
def test_connect_kind_connects_and_refused_port_is_refused(
    start_server: type[ServerThread],
) -> None:
    srv = start_server(Guard(GuardRules(**LENIENT)), None)
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    report = run_flood(
        FloodSpec(
            targets=[("127.0.0.1", srv.port), ("127.0.0.1", closed_port)],
            kinds=("connect",),
            rate_per_s=500,
            max_attempts=20,
        )
    )
    stats = report.kinds["connect"]
    assert stats.attempted == 20
    assert (stats.connected, stats.closed_by_us) == (10, 10)
    assert stats.refused == 10
    assert srv.guard.counters().get("accept", 0) >= 1


def test_tls_kinds_are_dropped_by_guarded_client_cert_server(
    start_server: type[ServerThread], server_ctx: ssl.SSLContext
) -> None:
    srv = start_server(Guard(GuardRules(**LENIENT)), server_ctx)
    report = run_flood(
        FloodSpec(
            targets=[("127.0.0.1", srv.port)],
            kinds=("tls_anon", "tls_foreign"),
            rate_per_s=200,
            max_attempts=20,
            hold_s=5,
        )
    )
    for kind in ("tls_anon", "tls_foreign"):
        stats = report.kinds[kind]
        assert stats.attempted == stats.connected == 10, stats
        # TLS 1.3: the client finishes first; the asyncio server then drops it without an alert
        assert stats.tls_handshakes == 10, stats
        assert stats.tls_failed + stats.reset_or_closed_by_peer == 10, stats
        assert stats.answered == 0, stats  # no application byte without a trusted cert


def blocking_tls_server(ctx: ssl.SSLContext, n: int) -> tuple[int, threading.Thread]:
    """A plain ssl-module server for ``n`` connections; unlike asyncio it sends alerts."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        with listener:
            for _ in range(n):
                conn, _ = listener.accept()
                conn.settimeout(10)
                try:
                    with ctx.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass
                finally:
                    conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def test_tls_alert_from_server_counts_as_tls_failed(server_ctx: ssl.SSLContext) -> None:
    port, thread = blocking_tls_server(server_ctx, 4)
    report = run_flood(
        FloodSpec(
            targets=[("127.0.0.1", port)],
            kinds=("tls_anon", "tls_foreign"),
            rate_per_s=50,
            max_attempts=4,
            max_open=1,
            hold_s=5,
        )
    )
    thread.join(10)
    for kind in ("tls_anon", "tls_foreign"):
        stats = report.kinds[kind]
        assert stats.connected == 2, stats
        assert stats.tls_failed == 2, stats


def test_halfopen_is_closed_by_guard_handshake_deadline(
    start_server: type[ServerThread], server_ctx: ssl.SSLContext
) -> None:
    guard = Guard(GuardRules(handshake_deadline_s=0.3, **LENIENT))
    srv = start_server(guard, server_ctx, handshake_timeout=20.0)
    report = run_flood(
        FloodSpec(
            targets=[("127.0.0.1", srv.port)],
            kinds=("halfopen",),
            rate_per_s=100,
            max_attempts=5,
            hold_s=15,
            duration_s=20,
        )
    )
    stats = report.kinds["halfopen"]
    assert stats.connected == stats.reset_or_closed_by_peer == 5, stats
    assert report.elapsed_s < 10  # far below hold_s: the peer closed, not our timer
    assert wait_until(lambda: guard.counters().get("handshake_deadline", 0) == 5)


def test_garbage_and_data_hello_get_answers_from_plain_listener(
    start_server: type[ServerThread],
) -> None:
    srv = start_server(Guard(GuardRules(**LENIENT)), None)
    report = run_flood(
        FloodSpec(
            targets=[("127.0.0.1", srv.port)],
            kinds=("garbage", "data_hello"),
            rate_per_s=200,
            max_attempts=10,
            hold_s=5,
            seed=7,
        )
    )
    for kind in ("garbage", "data_hello"):
        stats = report.kinds[kind]
        assert stats.connected == 5, stats
        assert stats.answered >= 1, stats
        assert 1 <= len(stats.sample_answers) <= 3
        assert all(len(s) <= 200 for s in stats.sample_answers)
        assert "bad handshake frame" in stats.sample_answers[0]
        assert stats.reset_or_closed_by_peer == 5, stats


def test_mixed_flood_trips_guard_without_blocking_caller_loop(
    server_ctx: ssl.SSLContext,
) -> None:
    """Server on the caller's own asyncio loop: it keeps serving while the flood runs."""
    guard = Guard(GuardRules(max_conn_rate_per_peer=20, max_half_open=4, max_half_open_per_peer=4))
    kinds = ("connect", "halfopen", "garbage", "tls_anon", "tls_foreign", "data_hello")

    async def scenario() -> tuple[FloodReport, int]:
        server = await guarded_serve(
            guard, "control", "127.0.0.1", 0, reply_error, ssl_ctx=server_ctx, handshake_timeout=2
        )
        port = server.sockets[0].getsockname()[1]
        ticks = 0
        try:
            spec = FloodSpec(
                targets=[("127.0.0.1", port)],
                kinds=kinds,
                rate_per_s=1000,
                max_attempts=300,
                duration_s=8,
                max_open=50,
                hold_s=1,
                connect_timeout_s=2,
            )
            with Flood(spec) as flood:
                while flood.running:
                    await asyncio.sleep(0.01)
                    ticks += 1
            return flood.report(), ticks
        finally:
            await stop_guarded(server)

    report, ticks = asyncio.run(scenario())
    assert ticks > 10  # the caller's loop kept running
    assert report.total_attempted == 300
    assert report.max_open_seen <= 50
    peer_closed = sum(k.reset_or_closed_by_peer for k in report.kinds.values())
    assert peer_closed > 0
    counters = guard.counters()
    assert counters.get("rate", 0) > 0, counters
    assert sum(k.connected for k in report.kinds.values()) > 0
    for stats in report.kinds.values():
        assert stats.outcomes_total() == stats.attempted
    print(report.to_json())


# ------------------------------------------------------------------------------ caps
def test_max_attempts_is_honoured(start_server: type[ServerThread]) -> None:
    srv = start_server(Guard(GuardRules(**LENIENT)), None)
    report = run_flood(
        FloodSpec(
            targets=[("127.0.0.1", srv.port)], kinds=("connect",), rate_per_s=2000, max_attempts=37
        )
    )
    assert report.total_attempted == 37
    assert report.ended_by == "max_attempts"


def test_duration_is_honoured(start_server: type[ServerThread]) -> None:
    srv = start_server(Guard(GuardRules(**LENIENT)), None)
    t0 = time.monotonic()
    report = run_flood(
        FloodSpec(
            targets=[("127.0.0.1", srv.port)],
            kinds=("halfopen",),
            rate_per_s=50,
            max_attempts=1_000_000,
            duration_s=1.0,
            hold_s=60,
            max_open=100,
        )
    )
    assert time.monotonic() - t0 < 6  # generous cap; the flood itself stops at 1 s
    assert report.ended_by == "duration"
    assert 0 < report.total_attempted <= 51
    # in-flight half-open sockets were cut at the time cap, not left for hold_s
    assert report.kinds["halfopen"].cancelled >= 1


def test_stop_closes_every_socket(start_server: type[ServerThread]) -> None:
    srv = start_server(Guard(GuardRules(handshake_deadline_s=60, **LENIENT)), None)
    time.sleep(0.1)
    baseline = fd_count()
    flood = Flood(
        FloodSpec(
            targets=[("127.0.0.1", srv.port)],
            kinds=("halfopen",),
            rate_per_s=1000,
            max_attempts=10_000,
            duration_s=25,
            hold_s=60,
            max_open=20,
        )
    ).start()
    assert wait_until(lambda: flood.report().open_now == 20)
    assert fd_count() >= baseline + 20
    report = flood.stop()
    assert flood.stop().total_attempted == report.total_attempted  # idempotent
    assert report.open_now == 0 and not report.running
    assert report.ended_by == "stop"
    assert report.max_open_seen == 20
    assert report.kinds["halfopen"].cancelled == report.kinds["halfopen"].attempted
    # the in-process server closes its side too once it sees our FINs
    assert wait_until(lambda: fd_count() == baseline), (fd_count(), baseline)


def test_stop_before_start_and_report_is_json() -> None:
    flood = Flood(FloodSpec(targets=[("127.0.0.1", 9)]))
    report = flood.stop()
    assert report.total_attempted == 0
    assert '"total_attempted": 0' in report.to_json()
    assert isinstance(report.kinds["connect"], KindReport)


# ------------------------------------------------------------------------------ memory
def test_rss_helpers_and_sampler_on_this_process() -> None:
    pid = os.getpid()
    assert 0 < rss_kib(pid) <= peak_rss_kib(pid)
    with pytest.raises(ProcessLookupError):
        rss_kib(2**22 + 12345)
    with RssSampler(pid, interval_ms=10) as sampler:
        time.sleep(0.1)
        blob = b"x" * (32 * 1024 * 1024)  # touched pages: counts in VmRSS
        time.sleep(0.2)
        del blob
        time.sleep(0.1)
    stats = sampler.stop()
    assert stats.samples >= 5
    assert stats.error == ""
    assert stats.max_kib >= stats.first_kib + 16 * 1024
    assert stats.min_kib <= stats.first_kib <= stats.max_kib
    assert stats.last_kib <= stats.max_kib


def test_flood_from_several_loopback_sources_is_tracked_per_peer() -> None:
    guard = Guard(GuardRules())
    srv = ServerThread(guard, None)
    try:
        spec = FloodSpec(targets=[("127.0.0.1", srv.port)], kinds=("halfopen",), rate_per_s=200,
                         max_attempts=6, duration_s=5, hold_s=0.5,
                         source_ips=("127.0.0.2", "127.0.0.3", "127.0.0.4"))  # fmt: skip
        with Flood(spec) as flood:
            assert flood.wait(10)
        peers = {c["peer_ip"] for c in guard.snapshot()["connections"]}
        assert flood.report().total_attempted == 6
        assert {"127.0.0.2", "127.0.0.3", "127.0.0.4"} <= peers
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="loopback"):
        FloodSpec(targets=[("127.0.0.1", 1)], source_ips=("10.0.0.1",))
