"""The stateful guard in front of every trustmig listener (the paper's NSE-H).

It combines a connection tracking module (:mod:`trustmig.guard.conntrack`) with a policy
matching module (:mod:`trustmig.guard.rules`). The cheap checks in :meth:`Guard.on_connect`
run before any TLS or key exchange so that a flood costs the host a dictionary lookup, not an
ECDHE handshake. Time comes from an injected clock so the logic is testable without sleeping.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from trustmig.guard.conntrack import (
    HALF_OPEN_STATES,
    ConnState,
    ConnTable,
    PeerBuckets,
    TokenBucket,
    TrackedConn,
)
from trustmig.guard.errors import GuardError, UnknownConnectionError
from trustmig.guard.rules import GuardRules, Verdict

#: Rule names used in verdicts and counters.
RULE_ACCEPT = "accept"
RULE_NETWORK = "network"
RULE_RATE = "rate"
RULE_RATE_STRANGERS = "rate_strangers"
RULE_HALF_OPEN = "half_open"
RULE_HALF_OPEN_PEER = "half_open_per_peer"
RULE_SESSIONS = "sessions"
RULE_SESSIONS_PEER = "sessions_per_peer"
RULE_IDENTITY = "identity"
RULE_CLOSED = "closed"
RULE_HANDSHAKE_DEADLINE = "handshake_deadline"
RULE_IDLE = "idle"
RULE_STALL = "stall"
RULE_PROVEN = "proven"
RULE_EVICTED = "evicted"
RULE_PROOF_DEADLINE = "proof_deadline"


@dataclass(frozen=True)
class GateAdmission:
    """A gated listener's new connection: its id, and the waiters evicted to make room
    (the caller closes their sockets)."""

    verdict: Verdict
    conn_id: int | None
    evicted: tuple[int, ...] = ()


P = ParamSpec("P")
R = TypeVar("R")


def _locked(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with args[0]._lock:  # type: ignore[attr-defined]
            return method(*args, **kwargs)

    return wrapper


class Guard:
    """Connection tracking + rule matching for one host's listeners.

    Thread-safe: the agent calls it from its event loop (control listener) and from the data
    listener's threads; every public method holds one re-entrant lock.
    """

    def __init__(
        self,
        rules: GuardRules,
        clock: Callable[[], float] = time.monotonic,
        *,
        peer_capacity: int = 4096,
        history: int = 256,
    ) -> None:
        if not isinstance(rules, GuardRules):
            raise GuardError(f"rules must be a GuardRules, got {type(rules).__name__}")
        self.rules = rules
        self._clock = clock
        self._table = ConnTable(history=history)
        self._buckets = PeerBuckets(
            rate=rules.max_conn_rate_per_peer,
            burst=2.0 * rules.max_conn_rate_per_peer,
            capacity=peer_capacity,
        )
        self._strangers = TokenBucket(
            rules.max_conn_rate_strangers, 2.0 * rules.max_conn_rate_strangers, clock()
        )
        self._counters: Counter[str] = Counter()
        self._next_id = 1
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ helpers
    def _hit(self, rule: str, reason: str, accept: bool = False) -> Verdict:
        self._counters[rule] += 1
        return Verdict(accept=accept, rule=rule, reason=reason)

    def _outside_networks(self, listener: str, peer_ip: str) -> Verdict | None:
        """The refusal of a peer outside the networks ``listener`` accepts (counted), or None."""
        if self.rules.network_allows(peer_ip, listener):
            return None
        nets = ", ".join(str(n) for n in self.rules.networks_for(listener))
        return self._hit(RULE_NETWORK, f"peer {peer_ip} is outside the allowed networks ({nets})")

    def _live(self, conn_id: int) -> TrackedConn | None:
        """Live record, or None for a recently ended one; unknown ids are an error."""
        conn = self._table.get_live(conn_id)
        if conn is not None:
            return conn
        if self._table.get_ended(conn_id) is not None or 0 < conn_id < self._next_id:
            return None
        raise UnknownConnectionError(
            f"connection id {conn_id} was never issued by this guard; "
            "use the id returned by on_connect"
        )

    # ------------------------------------------------------------------ events
    @_locked
    def on_connect(self, listener: str, peer_ip: str, peer_port: int) -> tuple[Verdict, int | None]:
        """Decide on a fresh TCP connection before any bytes are read from it.

        Checks in order of cost: network allow-list, per-peer rate, half-open caps, session
        caps. Refusals are counted per rule; accepted connections enter the table as NEW.
        """
        r = self.rules
        now = self._clock()
        if (outside := self._outside_networks(listener, peer_ip)) is not None:
            return outside, None
        # budgets per listener: a flood on the data port must not spend the control port's
        if not self._buckets.take(f"{listener} {peer_ip}", now):
            return self._hit(
                RULE_RATE,
                f"peer {peer_ip} exceeded {r.max_conn_rate_per_peer:g} connections/s "
                f"(burst {2 * r.max_conn_rate_per_peer:g})",
            ), None
        reserved = r.is_reserved(peer_ip)
        if not reserved and not self._strangers.take(now):
            return self._hit(
                RULE_RATE_STRANGERS,
                f"peer {peer_ip}: strangers (non-cluster addresses) exceeded "
                f"{r.max_conn_rate_strangers:g} connections/s together",
            ), None
        if not reserved and self._table.half_open >= r.max_half_open:
            return self._hit(
                RULE_HALF_OPEN,
                f"{self._table.half_open} handshakes already in progress (limit {r.max_half_open})",
            ), None
        if self._table.peer_half_open(peer_ip) >= r.max_half_open_per_peer:
            return self._hit(
                RULE_HALF_OPEN_PEER,
                f"peer {peer_ip} already has {self._table.peer_half_open(peer_ip)} handshakes "
                f"in progress (limit {r.max_half_open_per_peer})",
            ), None
        if not reserved and self._table.established >= r.max_sessions:
            return self._hit(
                RULE_SESSIONS,
                f"{self._table.established} sessions are open (limit {r.max_sessions})",
            ), None
        if self._table.peer_live(peer_ip) >= r.max_sessions_per_peer:
            return self._hit(
                RULE_SESSIONS_PEER,
                f"peer {peer_ip} already holds {self._table.peer_live(peer_ip)} connections "
                f"(limit {r.max_sessions_per_peer})",
            ), None
        conn = self._new_conn(listener, peer_ip, peer_port, now)
        self._table.add(conn)
        conn_id = conn.id
        return self._hit(RULE_ACCEPT, f"peer {peer_ip} admitted to {listener}", True), conn_id

    def _new_conn(self, listener: str, peer_ip: str, peer_port: int, now: float) -> TrackedConn:
        conn_id = self._next_id
        self._next_id += 1
        return TrackedConn(id=conn_id, listener=listener, peer_ip=peer_ip, peer_port=peer_port,
                           state=ConnState.NEW, started=now, last_activity=now,
                           last_bytes=now)  # fmt: skip

    @_locked
    def on_connect_gated(self, listener: str, peer_ip: str, peer_port: int) -> GateAdmission:
        """A fresh connection to a gated listener: it waits, UNPROVEN, for its first message.

        Only the network allow-list refuses here. No per-address budget applies, because an
        address proves nothing (peers, NATed guests and a flood share them); the waiting room
        is bounded instead, and when full its oldest waiters are evicted for the newcomer.
        """
        r = self.rules
        now = self._clock()
        if (outside := self._outside_networks(listener, peer_ip)) is not None:
            return GateAdmission(outside, None)
        evicted: list[int] = []
        while self._table.unproven >= r.max_unproven:
            oldest = self._table.oldest_unproven()
            assert oldest is not None
            self._counters[RULE_EVICTED] += 1
            self._table.end(oldest, ConnState.DROPPED,
                            f"evicted unproven after {now - oldest.started:.3f} s "
                            f"({r.max_unproven} were waiting)")  # fmt: skip
            evicted.append(oldest.id)
        conn = self._new_conn(listener, peer_ip, peer_port, now)
        conn.handshake_progress = "unproven"
        self._table.add_unproven(conn)
        verdict = self._hit(RULE_ACCEPT, f"peer {peer_ip} waits for proof on {listener}", True)
        return GateAdmission(verdict, conn.id, tuple(evicted))

    @_locked
    def on_proven(self, conn_id: int, proof: str) -> Verdict:
        """The first message carried a valid MAC (``proof`` names it): the connection leaves
        the waiting room for an ordinary handshake slot.

        No cap applies here: proven connections are bounded by what the keys admit (openings
        per migration key, one join per stream), and the global half-open cap is the one a
        flood of strangers on the control port fills.
        """
        conn = self._live(conn_id)
        if conn is None:
            return self._hit(RULE_CLOSED, f"connection {conn_id} was evicted or dropped")
        if conn.state is not ConnState.UNPROVEN:
            raise GuardError(f"connection {conn_id} is {conn.state.value}, not unproven")
        self._table.prove(conn)
        conn.handshake_progress = proof
        conn.last_activity = self._clock()
        return self._hit(RULE_PROVEN, f"connection {conn_id} proved {proof}", True)

    @_locked
    def on_proof_failed(self, conn_id: int, rule: str, reason: str) -> None:
        """The first message was malformed or its MAC wrong: dropped, counted under ``rule``."""
        conn = self._live(conn_id)
        if conn is None:
            return
        self._counters[rule] += 1
        self._table.end(conn, ConnState.DROPPED, reason)

    @_locked
    def expire_unproven(self) -> list[int]:
        """Waiters past the proof deadline, dropped; the gate closes their sockets."""
        now = self._clock()
        limit = self.rules.proof_deadline_s
        late: list[TrackedConn] = []
        for conn in self._table.unproven_conns():  # oldest first: stop at the first in time
            if now - conn.started <= limit:
                break
            late.append(conn)
        for conn in late:
            self._counters[RULE_PROOF_DEADLINE] += 1
            self._table.end(conn, ConnState.DROPPED, f"no first message within {limit:g} s")
        return [c.id for c in late]

    @_locked
    def is_live(self, conn_id: int) -> bool:
        """True while the guard still tracks the connection as open."""
        return self._table.get_live(conn_id) is not None

    @_locked
    def on_handshake_progress(self, conn_id: int, step: str) -> None:
        """Record a handshake step (e.g. ``tls-started``); NEW becomes HANDSHAKE.

        Progress does not extend the handshake deadline, which runs from ``on_connect``:
        a slow-loris peer cannot keep a half-open slot by trickling steps.
        """
        conn = self._live(conn_id)
        if conn is None:
            return
        conn.handshake_progress = step
        conn.last_activity = self._clock()
        if conn.state is ConnState.NEW:
            conn.state = ConnState.HANDSHAKE

    @_locked
    def on_authenticated(self, conn_id: int, identity: str) -> Verdict:
        """Apply the identity allow-list and session cap; accepted moves to ESTABLISHED."""
        conn = self._live(conn_id)
        if conn is None:
            return self._hit(RULE_CLOSED, f"connection {conn_id} is already closed or dropped")
        if conn.state not in HALF_OPEN_STATES:
            raise GuardError(
                f"connection {conn_id} is already {conn.state.value}; "
                "call on_authenticated once per connection"
            )
        if not identity or not self.rules.identity_allows(identity):
            verdict = self._hit(
                RULE_IDENTITY, f"identity {identity!r} is not in the allowed identities"
            )
            self._table.end(conn, ConnState.DROPPED, verdict.reason)
            return verdict
        if self._table.established >= self.rules.max_sessions:
            verdict = self._hit(
                RULE_SESSIONS,
                f"{self._table.established} sessions are open (limit {self.rules.max_sessions})",
            )
            self._table.end(conn, ConnState.DROPPED, verdict.reason)
            return verdict
        conn.identity = identity
        conn.handshake_progress = "authenticated"
        conn.last_activity = self._clock()
        self._table.establish(conn)
        return self._hit(RULE_ACCEPT, f"identity {identity!r} authenticated", True)

    @_locked
    def on_data_phase(self, conn_id: int) -> None:
        """Declare that bulk data now flows, so the (shorter) stall timeout applies."""
        conn = self._live(conn_id)
        if conn is None:
            return
        now = self._clock()
        conn.data_phase = True
        conn.last_bytes = now
        conn.last_activity = now

    @_locked
    def on_bytes(self, conn_id: int, n_in: int = 0, n_out: int = 0) -> None:
        """Account traffic; any non-zero count refreshes both idle and stall timers."""
        if n_in < 0 or n_out < 0:
            raise GuardError(f"byte counts must be >= 0, got n_in={n_in}, n_out={n_out}")
        conn = self._live(conn_id)
        if conn is None or (n_in == 0 and n_out == 0):
            return
        now = self._clock()
        conn.bytes_in += n_in
        conn.bytes_out += n_out
        conn.last_activity = now
        conn.last_bytes = now

    @_locked
    def on_close(self, conn_id: int) -> None:
        """The connection ended normally (idempotent; a dropped record stays DROPPED)."""
        conn = self._live(conn_id)
        if conn is None:
            return
        self._table.end(conn, ConnState.CLOSED, "closed")

    @_locked
    def sweep(self) -> list[tuple[int, str]]:
        """Drop connections whose deadline passed; return ``(conn_id, reason)`` to close."""
        r = self.rules
        now = self._clock()
        dropped: list[tuple[int, str]] = []
        for conn in self._table.live():
            rule: str | None = None
            reason = ""
            if conn.state is ConnState.UNPROVEN:
                continue  # the gate's own deadline (expire_unproven)
            if conn.state in HALF_OPEN_STATES:
                if now - conn.started > r.handshake_deadline_s:
                    rule = RULE_HANDSHAKE_DEADLINE
                    reason = (
                        f"handshake not finished within {r.handshake_deadline_s:g} s "
                        f"(last step {conn.handshake_progress})"
                    )
            elif conn.data_phase:
                if now - conn.last_bytes > r.stall_timeout_s:
                    rule = RULE_STALL
                    reason = f"no bytes for {r.stall_timeout_s:g} s during data transfer"
            elif now - conn.last_activity > r.idle_timeout_s:
                rule = RULE_IDLE
                reason = f"idle for {r.idle_timeout_s:g} s"
            if rule is not None:
                self._counters[rule] += 1
                self._table.end(conn, ConnState.DROPPED, reason)
                dropped.append((conn.id, reason))
        return dropped

    # ------------------------------------------------------------------ views
    @_locked
    def get(self, conn_id: int) -> TrackedConn:
        """The record of a live or recently ended connection."""
        conn = self._table.get_live(conn_id) or self._table.get_ended(conn_id)
        if conn is None:
            raise UnknownConnectionError(
                f"connection id {conn_id} is not tracked (never issued or aged out of history)"
            )
        return conn

    @property
    def table_size(self) -> int:
        """Live entries in the connection table."""
        return len(self._table)

    @property
    def history_size(self) -> int:
        """Entries in the recently-ended ring."""
        return self._table.ended_count

    @property
    def tracked_peers(self) -> int:
        """Peers that currently have a rate bucket."""
        return len(self._buckets)

    @_locked
    def counters(self) -> dict[str, int]:
        """Rule hits so far (copy)."""
        return dict(self._counters)

    @_locked
    def snapshot(self) -> dict[str, Any]:
        """JSON-able state for ``trustmig guard show --json``."""
        return {
            "connections": [c.to_dict() for c in self._table.live()]
            + [c.to_dict() for c in self._table.ended()],
            "counters": dict(self._counters),
            "rules": self.rules.to_dict(),
            "summary": {
                "half_open": self._table.half_open,
                "unproven": self._table.unproven,
                "established": self._table.established,
                "live": len(self._table),
                "recent_ended": self._table.ended_count,
                "tracked_peers": len(self._buckets),
            },
        }
