"""Connection tracking: a bounded table of live connections and bounded per-peer rate buckets.

Everything here is pure logic with time passed in as ``now``; memory stays bounded no matter
how many distinct peers an attacker spoofs, because a flood must not exhaust the host that is
supposed to receive migrations.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any


class ConnState(Enum):
    """Life cycle of a tracked connection."""

    #: accepted by TCP, its first message not yet proven (a gated listener's waiting room)
    UNPROVEN = "unproven"
    NEW = "new"
    HANDSHAKE = "handshake"
    ESTABLISHED = "established"
    CLOSED = "closed"
    DROPPED = "dropped"


HALF_OPEN_STATES = frozenset({ConnState.NEW, ConnState.HANDSHAKE})
LIVE_STATES = frozenset(
    {ConnState.UNPROVEN, ConnState.NEW, ConnState.HANDSHAKE, ConnState.ESTABLISHED}
)


@dataclass
class TrackedConn:
    """One connection as the guard sees it.

    ``data_phase`` and ``last_bytes`` extend the basic record: the stall rule only applies once
    the owner declared that bulk data is flowing, and measures silence since the last byte.
    """

    id: int
    listener: str
    peer_ip: str
    peer_port: int
    state: ConnState
    started: float
    last_activity: float
    bytes_in: int = 0
    bytes_out: int = 0
    identity: str | None = None
    handshake_progress: str = "tcp-accepted"
    data_phase: bool = False
    last_bytes: float = 0.0
    end_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view of the record."""
        return {
            "id": self.id,
            "listener": self.listener,
            "peer_ip": self.peer_ip,
            "peer_port": self.peer_port,
            "state": self.state.value,
            "started": self.started,
            "last_activity": self.last_activity,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "identity": self.identity,
            "handshake_progress": self.handshake_progress,
            "data_phase": self.data_phase,
            "end_reason": self.end_reason,
        }


class TokenBucket:
    """Classic token bucket: ``rate`` tokens per second, at most ``burst`` stored."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if available; time going backwards never refills the bucket."""
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = max(self.stamp, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class PeerBuckets:
    """Per-peer token buckets kept in an LRU of at most ``capacity`` peers.

    Evicting the least recently seen peer gives it a fresh (full) bucket if it returns; that is
    the price of bounded memory, and the global half-open cap still limits the damage.
    """

    def __init__(self, rate: float, burst: float, capacity: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, peer: str, now: float) -> bool:
        """Spend one token from ``peer``'s bucket (creating it full if unseen)."""
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            self._buckets[peer] = bucket
            while len(self._buckets) > self.capacity:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(peer)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)


class ConnTable:
    """Live connections by id plus a bounded ring of recently ended ones.

    The caller (the guard) refuses new entries once its caps are reached, so the live part is
    bounded by ``max_half_open + max_sessions``; the history ring by ``history``.
    """

    def __init__(self, history: int = 256) -> None:
        self._live: dict[int, TrackedConn] = {}
        self._ended: OrderedDict[int, TrackedConn] = OrderedDict()
        self._history = history
        self._half_open = 0
        self._established = 0
        #: UNPROVEN connections, oldest first: the gated listeners' waiting room. They count
        #: in no per-peer figure, since an address proves nothing about who is behind it.
        self._unproven: OrderedDict[int, TrackedConn] = OrderedDict()
        self._per_peer_half_open: dict[str, int] = {}
        self._per_peer_live: dict[str, int] = {}

    # --- counts -------------------------------------------------------------------------
    @property
    def half_open(self) -> int:
        return self._half_open

    @property
    def established(self) -> int:
        return self._established

    @property
    def unproven(self) -> int:
        return len(self._unproven)

    def oldest_unproven(self) -> TrackedConn | None:
        return next(iter(self._unproven.values()), None)

    def unproven_conns(self) -> Iterator[TrackedConn]:
        """Oldest first; the caller must not end connections while it iterates."""
        return iter(self._unproven.values())

    def peer_half_open(self, peer: str) -> int:
        return self._per_peer_half_open.get(peer, 0)

    def peer_live(self, peer: str) -> int:
        return self._per_peer_live.get(peer, 0)

    def __len__(self) -> int:
        return len(self._live)

    @property
    def ended_count(self) -> int:
        return len(self._ended)

    # --- access -------------------------------------------------------------------------
    def live(self) -> Iterator[TrackedConn]:
        return iter(list(self._live.values()))

    def ended(self) -> Iterator[TrackedConn]:
        return iter(list(self._ended.values()))

    def get_live(self, conn_id: int) -> TrackedConn | None:
        return self._live.get(conn_id)

    def get_ended(self, conn_id: int) -> TrackedConn | None:
        return self._ended.get(conn_id)

    # --- mutation -----------------------------------------------------------------------
    @staticmethod
    def _bump(counts: dict[str, int], key: str, delta: int) -> None:
        value = counts.get(key, 0) + delta
        if value:
            counts[key] = value
        else:
            counts.pop(key, None)

    def add(self, conn: TrackedConn) -> None:
        """Insert a NEW connection."""
        self._live[conn.id] = conn
        self._half_open += 1
        self._bump(self._per_peer_half_open, conn.peer_ip, 1)
        self._bump(self._per_peer_live, conn.peer_ip, 1)

    def add_unproven(self, conn: TrackedConn) -> None:
        """Insert an UNPROVEN connection (it waits for its first message to be proven)."""
        conn.state = ConnState.UNPROVEN
        self._live[conn.id] = conn
        self._unproven[conn.id] = conn

    def prove(self, conn: TrackedConn) -> None:
        """An UNPROVEN connection proved its first message: it becomes an ordinary NEW one."""
        if self._unproven.pop(conn.id, None) is None:
            return
        self._live.pop(conn.id, None)
        conn.state = ConnState.NEW
        self.add(conn)

    def establish(self, conn: TrackedConn) -> None:
        """Move a half-open connection to ESTABLISHED, keeping the counters exact."""
        if conn.state in HALF_OPEN_STATES:
            self._half_open -= 1
            self._bump(self._per_peer_half_open, conn.peer_ip, -1)
            self._established += 1
        conn.state = ConnState.ESTABLISHED

    def end(self, conn: TrackedConn, state: ConnState, reason: str) -> None:
        """Move a live connection to the history ring as CLOSED or DROPPED."""
        if self._live.pop(conn.id, None) is None:
            return
        if self._unproven.pop(conn.id, None) is not None:
            conn.state = state
            conn.end_reason = reason
            self._remember(conn)
            return
        if conn.state in HALF_OPEN_STATES:
            self._half_open -= 1
            self._bump(self._per_peer_half_open, conn.peer_ip, -1)
        elif conn.state is ConnState.ESTABLISHED:
            self._established -= 1
        self._bump(self._per_peer_live, conn.peer_ip, -1)
        conn.state = state
        conn.end_reason = reason
        self._remember(conn)

    def _remember(self, conn: TrackedConn) -> None:
        self._ended[conn.id] = conn
        while len(self._ended) > self._history:
            self._ended.popitem(last=False)
