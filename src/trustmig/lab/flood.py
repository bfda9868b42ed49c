"""A bounded, loopback-only connection flood against an agent's listeners.

Why it exists: the guard (:mod:`trustmig.guard`) claims that a flood of junk connections costs
a migration host a dictionary lookup rather than a TLS handshake, and that its memory stays
bounded. The migration benchmark and the attack lab's DoS attack check that claim by flooding
a real agent while a real migration runs, so the generator must:

* never send a packet off the machine: every target must be a loopback IP address
  (127.0.0.0/8 or ::1); names are refused because resolution could leave loopback;
* stay bounded itself: hard caps on attempts, wall time and simultaneously open sockets;
* not disturb its caller: it runs in one background thread with its own asyncio loop, so a
  pytest test or an asyncio program driving a migration keeps its own loop free;
* report only what happened on the sockets: every counter is incremented from an observed
  connect result, received bytes, EOF, reset, TLS alert or timeout, never from assumptions.

Each attempt ends with exactly one terminal outcome (``refused``, ``timed_out``,
``reset_or_closed_by_peer``, ``tls_failed``, ``closed_by_us``, ``cancelled`` or ``errors``);
``connected`` (the TCP handshake completed), ``tls_handshakes`` (the TLS handshake completed on
our side, i.e. the server spent a key exchange on us) and ``answered`` (the peer sent bytes
back) are flags on top. With TLS 1.3 the server checks the client certificate after the client
already considers the handshake done, so a rejection shows up on the first read: as a TLS alert
(``tls_failed``) from servers that send one, or as a bare close (``reset_or_closed_by_peer``)
from asyncio servers such as ``guarded_serve``, which drop the connection without flushing the
alert.

:func:`rss_kib`, :func:`peak_rss_kib` and :class:`RssSampler` read ``/proc`` to show that the
flooded agent's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import math
import random
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmig.agent.protocol import encode as encode_control
from trustmig.channel.wire import FIELD_LENGTH, FRAME_HEADER, MsgType

log = logging.getLogger(__name__)

#: Every flood kind, in the order reports list them.
ALL_KINDS = ("connect", "halfopen", "garbage", "tls_anon", "tls_foreign", "data_hello")
KINDS = frozenset(ALL_KINDS)

#: Upper bounds that keep the generator itself bounded whatever the caller asks for.
MAX_OPEN_LIMIT = 4096
MAX_RATE_PER_S = 100_000.0
#: Answers and errors kept per kind, and their length.
SAMPLES_PER_KIND = 3
SAMPLE_CHARS = 200
#: Largest read per recv; everything past the first chunk is only counted, never stored.
READ_CHUNK = 4096
#: Catch-up limit for the pacer: after a stall it bursts at most this much lost schedule.
MAX_CATCH_UP_S = 0.1
#: Poll interval while waiting for a free socket slot (also bounds stop() latency).
SLOT_POLL_S = 0.05

CONTROL_REQUEST = encode_control({"op": "migrate", "id": 1, "params": {"vm": "x", "to": "y"}})


# ---------------------------------------------------------------------------------- spec
def check_loopback(host: str) -> None:
    """Raise ValueError unless ``host`` is a literal loopback IP address."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"flood target {host!r} is not an IP address; use a loopback address "
            "such as 127.0.0.1 or ::1"
        ) from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if not addr.is_loopback:
        raise ValueError(
            f"flood target {host} is not a loopback address (127.0.0.0/8 or ::1); "
            "floods never leave this machine"
        )


def _check_positive(name: str, value: float, upper: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} is {value!r}; it must be a number")
    if not math.isfinite(value) or not 0 < value <= upper:
        raise ValueError(f"{name} is {value!r}; it must be > 0 and <= {upper:g}")


def _check_count(name: str, value: int, upper: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"{name} is {value!r}; it must be an integer from 1 to {upper:g}")


@dataclass
class FloodSpec:
    """What to flood, how hard, and the hard caps that bound the flood."""

    targets: list[tuple[str, int]]
    kinds: tuple[str, ...] = ("connect",)
    rate_per_s: float = 500.0
    max_attempts: int = 1000
    duration_s: float = 10.0
    max_open: int = 200
    hold_s: float = 5.0
    connect_timeout_s: float = 2.0
    tls_verdict_wait_s: float = 0.05
    seed: int | None = None
    #: Loopback source addresses the attempts are bound to, round-robin (a flood from many
    #: "hosts"); empty means the kernel's choice (127.0.0.1).
    source_ips: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("flood needs at least one (host, port) target")
        for target in self.targets:
            if not isinstance(target, tuple | list) or len(target) != 2:
                raise ValueError(f"flood target {target!r} must be a (host, port) pair")
            host, port = target
            check_loopback(str(host))
            _check_count("target port", port, 65535)
        for ip in self.source_ips:
            check_loopback(str(ip))
        if not self.kinds:
            raise ValueError(f"flood needs at least one kind out of {sorted(KINDS)}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown flood kinds {unknown}; choose from {sorted(KINDS)}")
        _check_positive("rate_per_s", self.rate_per_s, MAX_RATE_PER_S)
        _check_count("max_attempts", self.max_attempts)
        _check_positive("duration_s", self.duration_s)
        _check_count("max_open", self.max_open, MAX_OPEN_LIMIT)
        _check_positive("hold_s", self.hold_s)
        _check_positive("connect_timeout_s", self.connect_timeout_s)
        wait = self.tls_verdict_wait_s
        if (
            isinstance(wait, bool)
            or not isinstance(wait, int | float)
            or not 0 <= wait <= self.hold_s
        ):
            raise ValueError(
                f"tls_verdict_wait_s is {self.tls_verdict_wait_s!r}; it must be from 0 to hold_s"
            )


# -------------------------------------------------------------------------------- report
class Outcome(Enum):
    """Terminal outcome of one attempt; the value names the counter it increments."""

    REFUSED = "refused"
    CLOSED_BY_PEER = "reset_or_closed_by_peer"
    TIMED_OUT = "timed_out"
    TLS_FAILED = "tls_failed"
    CLOSED_BY_US = "closed_by_us"
    CANCELLED = "cancelled"
    ERROR = "errors"


@dataclass
class KindReport:
    """Counters for one flood kind; see the module docstring for their meaning."""

    attempted: int = 0
    connected: int = 0
    refused: int = 0
    reset_or_closed_by_peer: int = 0
    timed_out: int = 0
    tls_failed: int = 0
    tls_handshakes: int = 0
    answered: int = 0
    closed_by_us: int = 0
    cancelled: int = 0
    errors: int = 0
    sample_answers: list[str] = field(default_factory=list)
    sample_errors: list[str] = field(default_factory=list)

    def outcomes_total(self) -> int:
        """Attempts that have ended (equals ``attempted`` once the flood finished)."""
        return sum(getattr(self, o.value) for o in Outcome)


@dataclass
class FloodReport:
    """What the flood did, as observed on its sockets."""

    kinds: dict[str, KindReport]
    total_attempted: int
    requested_rate_per_s: float
    achieved_rate_per_s: float
    elapsed_s: float
    max_open_seen: int
    open_now: int
    running: bool
    ended_by: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _sample(data: bytes) -> str:
    return data[:SAMPLE_CHARS].decode("utf-8", "backslashreplace")[:SAMPLE_CHARS]


def classify(exc: BaseException) -> Outcome:
    """Map an exception raised on a flood socket to the outcome it shows."""
    if isinstance(exc, ConnectionRefusedError):
        return Outcome.REFUSED
    if isinstance(exc, TimeoutError):
        return Outcome.TIMED_OUT
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return Outcome.CLOSED_BY_PEER
    if isinstance(exc, ssl.SSLError):
        return Outcome.TLS_FAILED
    if isinstance(exc, ConnectionError | asyncio.IncompleteReadError | EOFError):
        return Outcome.CLOSED_BY_PEER
    return Outcome.ERROR


# ------------------------------------------------------------------------ TLS contexts
def _client_context() -> ssl.SSLContext:
    """TLS 1.3 client that does not verify the server (we only want to knock)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: str, issuer: str, public: ec.EllipticCurvePublicKey, signer: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=subject == issuer, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )


def foreign_client_context() -> ssl.SSLContext:
    """Client context presenting a leaf from a freshly generated CA no target trusts."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(
        "trustmig-flood-foreign-ca", "trustmig-flood-foreign-ca", ca_key.public_key(), ca_key
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("host-b", "trustmig-flood-foreign-ca", leaf_key.public_key(), ca_key)
    ctx = _client_context()
    with tempfile.TemporaryDirectory(prefix="trustmig-flood-") as tmp:
        chain, key = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
        key.touch(mode=0o600)
        key.write_bytes(_pem_key(leaf_key))
        chain.write_bytes(
            leaf.public_bytes(serialization.Encoding.PEM)
            + ca.public_bytes(serialization.Encoding.PEM)
        )
        ctx.load_cert_chain(chain, key)
    return ctx


# --------------------------------------------------------------------------------- flood
AttemptFn = Callable[[socket.socket, str, KindReport], Awaitable[Outcome]]


class Flood:
    """Runs one :class:`FloodSpec` in a background thread with its own asyncio loop."""

    def __init__(self, spec: FloodSpec) -> None:
        if not isinstance(spec, FloodSpec):
            raise TypeError(f"Flood needs a FloodSpec, got {type(spec).__name__}")
        self.spec = spec
        self._rng = random.Random(spec.seed)
        self._lock = threading.Lock()
        self._kinds = {k: KindReport() for k in spec.kinds}
        self._socks: set[socket.socket] = set()
        self._next_source = -1
        self._max_open_seen = 0
        self._inflight = 0
        self._thread: threading.Thread | None = None
        self._stop_flag = threading.Event()
        self._t0 = 0.0
        self._gen_end: float | None = None
        self._end: float | None = None
        self._ended_by = ""
        self._anon_ctx: ssl.SSLContext | None = None
        self._foreign_ctx: ssl.SSLContext | None = None
        self._attempt_fns: dict[str, AttemptFn] = {
            "connect": self._do_connect,
            "halfopen": self._do_halfopen,
            "garbage": self._do_garbage,
            "data_hello": self._do_data_hello,
            "tls_anon": self._do_tls_anon,
            "tls_foreign": self._do_tls_foreign,
        }

    # ------------------------------------------------------------------ public API
    def start(self) -> Flood:
        """Start the background thread (once); returns self."""
        if self._thread is not None:
            raise RuntimeError("this Flood was already started; make a new one")
        if "tls_anon" in self.spec.kinds:
            self._anon_ctx = _client_context()
        if "tls_foreign" in self.spec.kinds:
            self._foreign_ctx = foreign_client_context()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(
            target=self._thread_main, name="trustmig-flood", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> FloodReport:
        """Stop the flood, close every socket and join the thread (idempotent)."""
        self._stop_flag.set()
        if self._thread is not None:
            self._thread.join()
        self._close_all()
        return self.report()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the flood to end by itself; True when it has ended."""
        if self._thread is None:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def report(self) -> FloodReport:
        """A consistent snapshot of the counters (callable while running)."""
        with self._lock:
            kinds = {k: KindReport(**asdict(r)) for k, r in self._kinds.items()}
            open_now, max_open = len(self._socks), self._max_open_seen
            ended_by = self._ended_by
        now = time.monotonic()
        started = self._thread is not None
        total = sum(r.attempted for r in kinds.values())
        gen_window = ((self._gen_end or now) - self._t0) if started else 0.0
        return FloodReport(
            kinds=kinds,
            total_attempted=total,
            requested_rate_per_s=self.spec.rate_per_s,
            achieved_rate_per_s=round(total / gen_window, 1) if gen_window > 0 else 0.0,
            elapsed_s=round(((self._end or now) - self._t0) if started else 0.0, 3),
            max_open_seen=max_open,
            open_now=open_now,
            running=self.running,
            ended_by=ended_by,
        )

    def __enter__(self) -> Flood:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ thread + loop
    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_quiet_exception_handler)
        try:
            loop.run_until_complete(self._main(loop))
        except Exception as exc:  # pragma: no cover - a bug, not a socket outcome
            log.exception("flood loop failed")
            self._set_ended_by(f"error: {exc}")
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._close_all()
            self._end = time.monotonic()

    def _set_ended_by(self, why: str) -> None:
        with self._lock:
            if not self._ended_by:
                self._ended_by = why

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = loop.time() + self.spec.duration_s - (time.monotonic() - self._t0)
        tasks: set[asyncio.Task[Outcome]] = set()
        await self._generate(loop, deadline, tasks)
        self._gen_end = time.monotonic()
        if tasks and not self._stop_flag.is_set():
            await self._sleep_or_stop(loop, deadline - loop.time(), until_idle=tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let aborted transports run connection_lost

    async def _generate(
        self, loop: asyncio.AbstractEventLoop, deadline: float, tasks: set[asyncio.Task[Outcome]]
    ) -> None:
        """Launch attempts on schedule until a cap or stop() ends the flood."""
        spec = self.spec
        interval = 1.0 / spec.rate_per_s
        due = loop.time()
        for i in range(spec.max_attempts):
            if not await self._wait_for_slot(loop, deadline):
                return
            now = loop.time()
            due = max(due, now - MAX_CATCH_UP_S)
            if due > now and not await self._sleep_or_stop(loop, min(due, deadline) - now):
                return
            if loop.time() >= deadline:
                self._set_ended_by("duration")
                return
            kind = spec.kinds[i % len(spec.kinds)]
            target = spec.targets[(i // len(spec.kinds)) % len(spec.targets)]
            tasks.add(self._launch(loop, kind, target, tasks))
            due += interval
        self._set_ended_by("max_attempts")

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop, deadline: float) -> bool:
        """Block while ``max_open`` attempts are in flight; False when the flood must end."""
        while True:
            if self._stop_flag.is_set():
                self._set_ended_by("stop")
                return False
            if loop.time() >= deadline:
                self._set_ended_by("duration")
                return False
            if self._inflight < self.spec.max_open:
                return True
            await asyncio.sleep(min(SLOT_POLL_S, max(0.0, deadline - loop.time())))

    async def _sleep_or_stop(
        self,
        loop: asyncio.AbstractEventLoop,
        seconds: float,
        until_idle: set[asyncio.Task[Outcome]] | None = None,
    ) -> bool:
        """Sleep ``seconds`` (or until ``until_idle`` is empty); False if stop() was called.

        Sleeps in slices of at most ``SLOT_POLL_S`` so stop() takes effect quickly.
        """
        end = loop.time() + max(0.0, seconds)
        while not self._stop_flag.is_set():
            left = end - loop.time()
            if left <= 0 or (until_idle is not None and not until_idle):
                return True
            await asyncio.sleep(min(left, SLOT_POLL_S))
        self._set_ended_by("stop")
        return False

    # ------------------------------------------------------------------ one attempt
    def _launch(
        self,
        loop: asyncio.AbstractEventLoop,
        kind: str,
        target: tuple[str, int],
        tasks: set[asyncio.Task[Outcome]],
    ) -> asyncio.Task[Outcome]:
        """Count the attempt as in flight now (so ``max_open`` holds) and start its task."""
        stats = self._kinds[kind]
        with self._lock:
            stats.attempted += 1
        self._inflight += 1
        task = loop.create_task(self._attempt(kind, target))
        task.add_done_callback(lambda t: self._finish(stats, t, tasks))
        return task

    def _finish(
        self, stats: KindReport, task: asyncio.Task[Outcome], tasks: set[asyncio.Task[Outcome]]
    ) -> None:
        """Record the attempt's outcome (also for tasks cancelled before they ever ran)."""
        tasks.discard(task)
        self._inflight -= 1
        if task.cancelled():
            outcome = Outcome.CANCELLED
        elif (exc := task.exception()) is not None:  # pragma: no cover - _attempt catches all
            self._note_error(stats, exc)
            outcome = Outcome.ERROR
        else:
            outcome = task.result()
        self._count(stats, outcome)

    async def _attempt(self, kind: str, target: tuple[str, int]) -> Outcome:
        """One connection: connect, act out ``kind``, close; returns the observed outcome."""
        stats = self._kinds[kind]
        sock: socket.socket | None = None
        try:
            sock = self._new_socket(target[0])
            await self._connect(sock, target)
            with self._lock:
                stats.connected += 1
            return await self._attempt_fns[kind](sock, target[0], stats)
        except Exception as exc:
            outcome = classify(exc)
            if outcome is Outcome.ERROR:
                self._note_error(stats, exc)
            return outcome
        finally:
            if sock is not None:
                self._close(sock)

    def _new_socket(self, host: str) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        if self.spec.source_ips:
            with self._lock:
                self._next_source = (self._next_source + 1) % len(self.spec.source_ips)
                ip = self.spec.source_ips[self._next_source]
            try:
                sock.bind((ip, 0))
            except OSError:
                sock.close()
                raise
        with self._lock:
            self._socks.add(sock)
            self._max_open_seen = max(self._max_open_seen, len(self._socks))
        return sock

    async def _connect(self, sock: socket.socket, target: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.spec.connect_timeout_s):
            await loop.sock_connect(sock, target)

    def _close(self, sock: socket.socket) -> None:
        sock.close()
        with self._lock:
            self._socks.discard(sock)

    def _close_all(self) -> None:
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for sock in socks:
            sock.close()

    def _count(self, stats: KindReport, outcome: Outcome) -> None:
        with self._lock:
            setattr(stats, outcome.value, getattr(stats, outcome.value) + 1)

    def _note_error(self, stats: KindReport, exc: BaseException) -> None:
        with self._lock:
            if len(stats.sample_errors) < SAMPLES_PER_KIND:
                stats.sample_errors.append(f"{type(exc).__name__}: {exc}"[:SAMPLE_CHARS])

    def _note_answer(self, stats: KindReport, data: bytes, first: bool) -> None:
        if not first:
            return
        with self._lock:
            stats.answered += 1
            if len(stats.sample_answers) < SAMPLES_PER_KIND:
                stats.sample_answers.append(_sample(data))

    # ------------------------------------------------------------------ raw kinds
    async def _read_until_close(self, sock: socket.socket, stats: KindReport) -> Outcome:
        """Read until EOF (peer closed) or ``hold_s`` passes (raises TimeoutError)."""
        loop = asyncio.get_running_loop()
        first = True
        async with asyncio.timeout(self.spec.hold_s):
            while data := await loop.sock_recv(sock, READ_CHUNK):
                self._note_answer(stats, data, first)
                first = False
        return Outcome.CLOSED_BY_PEER

    async def _do_connect(self, sock: socket.socket, host: str, stats: KindReport) -> Outcome:
        return Outcome.CLOSED_BY_US

    async def _do_halfopen(self, sock: socket.socket, host: str, stats: KindReport) -> Outcome:
        try:
            return await self._read_until_close(sock, stats)
        except TimeoutError:
            return Outcome.CLOSED_BY_US  # held the slot for the whole hold_s

    async def _send_then_read(
        self, sock: socket.socket, chunks: list[bytes], stats: KindReport
    ) -> Outcome:
        """Send ``chunks`` with short pauses, then read until the peer closes.

        A peer that answers and closes after the first chunk makes later writes fail; the
        answer is still in our receive buffer, so read it before reporting the close.
        """
        loop = asyncio.get_running_loop()
        for i, chunk in enumerate(chunks):
            if i:
                await asyncio.sleep(0.005)
            try:
                await loop.sock_sendall(sock, chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        return await self._read_until_close(sock, stats)

    async def _do_garbage(self, sock: socket.socket, host: str, stats: KindReport) -> Outcome:
        chunks = [self._rng.randbytes(self._rng.randint(16, 512)) for _ in range(3)]
        return await self._send_then_read(sock, chunks, stats)

    async def _do_data_hello(self, sock: socket.socket, host: str, stats: KindReport) -> Outcome:
        body = FIELD_LENGTH.pack(4) + b"TMIG" + self._rng.randbytes(self._rng.randint(32, 256))
        frame = FRAME_HEADER.pack(len(body), MsgType.CLIENT_HELLO) + body
        return await self._send_then_read(sock, [frame], stats)

    # ------------------------------------------------------------------ TLS kinds
    async def _do_tls_anon(self, sock: socket.socket, host: str, stats: KindReport) -> Outcome:
        assert self._anon_ctx is not None
        return await self._tls_request(sock, host, self._anon_ctx, stats)

    async def _do_tls_foreign(self, sock: socket.socket, host: str, stats: KindReport) -> Outcome:
        assert self._foreign_ctx is not None
        return await self._tls_request(sock, host, self._foreign_ctx, stats)

    async def _tls_request(
        self, sock: socket.socket, host: str, ctx: ssl.SSLContext, stats: KindReport
    ) -> Outcome:
        """TLS handshake, a short wait for the server's verdict, one request, read to close."""
        timeout = self.spec.connect_timeout_s
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=ctx, server_hostname=host, ssl_handshake_timeout=timeout
            )
        with self._lock:
            stats.tls_handshakes += 1
        try:
            verdict = await self._read_briefly(reader, stats)
            if verdict is not None:
                return verdict
            writer.write(CONTROL_REQUEST)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await writer.drain()  # a refusal is read below, not lost to the write error
            return await self._read_stream(reader, stats, self.spec.hold_s)
        finally:
            writer.transport.abort()

    async def _read_briefly(
        self, reader: asyncio.StreamReader, stats: KindReport
    ) -> Outcome | None:
        """Listen ``tls_verdict_wait_s`` for a refusal; None if the server stayed silent.

        A TLS 1.3 server checks our certificate after our side finished the handshake; writing
        at once races its alert and close, and the resulting reset would hide the alert.
        """
        wait = min(self.spec.tls_verdict_wait_s, self.spec.hold_s)
        if wait <= 0:
            return None
        try:
            async with asyncio.timeout(wait):
                data = await reader.read(READ_CHUNK)
        except TimeoutError:
            return None
        if not data:
            return Outcome.CLOSED_BY_PEER
        self._note_answer(stats, data, True)
        return await self._read_stream(reader, stats, self.spec.hold_s, answered=True)

    async def _read_stream(
        self,
        reader: asyncio.StreamReader,
        stats: KindReport,
        limit_s: float,
        answered: bool = False,
    ) -> Outcome:
        """Read until EOF (peer closed) or ``limit_s`` passes (raises TimeoutError)."""
        async with asyncio.timeout(limit_s):
            while data := await reader.read(READ_CHUNK):
                self._note_answer(stats, data, not answered)
                answered = True
        return Outcome.CLOSED_BY_PEER


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Flood sockets fail by design; keep asyncio's complaints out of the caller's output."""
    log.debug("flood loop: %s", context.get("message"), exc_info=context.get("exception"))


# ----------------------------------------------------------------------------- memory
def _status_kib(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid} (no /proc/{pid}/status)") from None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ValueError(f"/proc/{pid}/status has no {key} line (a kernel thread or a zombie?)")


def rss_kib(pid: int) -> int:
    """Current resident set size of ``pid`` in KiB (VmRSS)."""
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    """Peak resident set size of ``pid`` in KiB (VmHWM)."""
    return _status_kib(pid, "VmHWM")


@dataclass
class RssStats:
    """VmRSS samples of one process, in KiB."""

    pid: int
    samples: int = 0
    first_kib: int = 0
    last_kib: int = 0
    max_kib: int = 0
    min_kib: int = 0
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RssSampler:
    """Samples VmRSS of ``pid`` every ``interval_ms`` in a background thread."""

    def __init__(self, pid: int, interval_ms: float = 50.0) -> None:
        _check_positive("interval_ms", interval_ms)
        self.pid = pid
        self.interval_s = interval_ms / 1000.0
        self._stats = RssStats(pid=pid)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        if self._thread is not None:
            raise RuntimeError("this RssSampler was already started")
        self._sample()  # first sample synchronously, so first_kib is the baseline
        self._thread = threading.Thread(target=self._run, name="trustmig-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> RssStats:
        """Stop sampling (idempotent), take a last sample and return the stats."""
        if not self._stop.is_set():
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._sample()
        return self.stats()

    def stats(self) -> RssStats:
        with self._lock:
            return RssStats(**asdict(self._stats))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self._sample():
                return

    def _sample(self) -> bool:
        try:
            kib = rss_kib(self.pid)
        except (ProcessLookupError, ValueError) as exc:
            with self._lock:
                self._stats.error = str(exc)
            return False
        with self._lock:
            s = self._stats
            if s.samples == 0:
                s.first_kib = s.min_kib = kib
            s.samples += 1
            s.last_kib = kib
            s.max_kib = max(s.max_kib, kib)
            s.min_kib = min(s.min_kib, kib)
        return True

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
