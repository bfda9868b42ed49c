"""Guard rules: what the guard in front of a listener allows, and the verdicts it returns.

The rules are deliberately small and numeric so that they can be checked *before* any TLS or
key exchange: an attacker who floods a listener must not be able to make the host spend CPU on
cryptography (the paper's availability threat against migration hosts).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from trustmig.guard.errors import InvalidRulesError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Verdict:
    """Outcome of one rule check: ``rule`` names the rule that decided, ``reason`` says why."""

    accept: bool
    rule: str
    reason: str


def parse_network(cidr: str) -> IPNetwork:
    """Parse one allow-list entry, refusing host bits so a typo cannot widen the allow-list."""
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise InvalidRulesError(
                f"allowed_networks entry {cidr!r} is not a CIDR network; "
                "write it like 10.0.0.0/8 or fd00::/8"
            ) from None
        raise InvalidRulesError(
            f"allowed_networks entry {cidr!r} has host bits set; did you mean {loose}?"
        ) from None


#: the agent's listeners that the guard (and its nftables rules) know by name
LISTENERS = ("control", "data")


@dataclass
class GuardRules:
    """Limits enforced by :class:`trustmig.guard.guard.Guard` and rendered by ``render_nft``."""

    allowed_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8"])
    allowed_identities: list[str] | None = None
    max_conn_rate_per_peer: float = 20.0
    max_half_open: int = 32
    max_half_open_per_peer: int = 8
    handshake_deadline_s: float = 5.0
    idle_timeout_s: float = 60.0
    stall_timeout_s: float = 30.0
    max_sessions: int = 64
    max_sessions_per_peer: int = 16
    #: Addresses of the cluster's own hosts. They are exempt from the *global* half-open and
    #: session caps (never from the per-peer ones), so a flood from many addresses that fills
    #: the global table cannot lock the legitimate peers out of a migration.
    reserved_peers: list[str] = field(default_factory=list)
    #: New connections per second from addresses that are *not* cluster peers, all together.
    #: Every admitted stranger costs a TLS or channel handshake; this caps that CPU however
    #: many addresses a flood comes from (the per-peer rate cannot).
    max_conn_rate_strangers: float = 20.0
    #: Narrower networks for one listener ("control", "data"): on a host with separate
    #: management and migration segments, each port accepts only its own segment.
    listener_networks: dict[str, list[str]] = field(default_factory=dict)
    #: Gated listeners (data): connections waiting for their first message to be proven (an
    #: HMAC under a key only an authenticated peer holds). When the room is full the *oldest*
    #: waiter is evicted rather than the newcomer refused, so a flood, from whatever address,
    #: can only shorten the wait: a real peer proves itself with its first packet.
    max_unproven: int = 256
    #: How long a gated connection may take to send its first message.
    proof_deadline_s: float = 3.0
    #: Install these rules in the kernel (``nft``, table ``inet trustmig``) while the agent runs.
    apply_nftables: bool = False

    def __post_init__(self) -> None:
        self._networks: tuple[IPNetwork, ...] = tuple(
            parse_network(c) for c in self.allowed_networks
        )
        if not isinstance(self.listener_networks, dict):
            raise InvalidRulesError("listener_networks must map a listener to a list of networks")
        for name in self.listener_networks:
            if name not in LISTENERS:
                raise InvalidRulesError(
                    f"listener_networks has {name!r}; use {' or '.join(LISTENERS)}"
                )
        self._listener_networks: dict[str, tuple[IPNetwork, ...]] = {
            name: tuple(parse_network(c) for c in nets)
            for name, nets in self.listener_networks.items()
        }
        for ip in self.reserved_peers:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise InvalidRulesError(
                    f"reserved_peers entry {ip!r} is not an IP address; list the peers' addresses"
                ) from None
        if self.allowed_identities is not None:
            for ident in self.allowed_identities:
                if not isinstance(ident, str) or not ident.strip():
                    raise InvalidRulesError(
                        f"allowed_identities entry {ident!r} is empty; list host or user names, "
                        "or set allowed_identities to None to allow any authenticated peer"
                    )
        for name in (
            "max_conn_rate_per_peer",
            "max_conn_rate_strangers",
            "handshake_deadline_s",
            "proof_deadline_s",
            "idle_timeout_s",
            "stall_timeout_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise InvalidRulesError(f"{name} is {value!r}; it must be a positive finite number")
        for name in (
            "max_half_open",
            "max_half_open_per_peer",
            "max_unproven",
            "max_sessions",
            "max_sessions_per_peer",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRulesError(f"{name} is {value!r}; it must be an integer >= 1")

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        """The parsed allow-list (validated once, at construction)."""
        return self._networks

    def networks_for(self, listener: str | None) -> tuple[IPNetwork, ...]:
        """The networks a listener accepts (its own list if it has one, else the allow-list)."""
        if listener is not None and listener in self._listener_networks:
            return self._listener_networks[listener]
        return self._networks

    def network_allows(self, peer_ip: str, listener: str | None = None) -> bool:
        """True when ``peer_ip`` lies in one of the networks ``listener`` accepts.

        IPv4-mapped IPv6 peers (``::ffff:a.b.c.d``, seen on dual-stack sockets) are matched as
        IPv4 so that a v4 allow-list also covers them.
        """
        try:
            addr = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        nets = self.networks_for(listener)
        return any(addr.version == net.version and addr in net for net in nets)

    def is_reserved(self, peer_ip: str) -> bool:
        """True when ``peer_ip`` is one of the cluster's own hosts (see ``reserved_peers``);
        IPv4-mapped IPv6 peers (``::ffff:a.b.c.d`` on dual-stack sockets) match as IPv4."""
        if peer_ip in self.reserved_peers:
            return True
        try:
            addr = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped) in self.reserved_peers
        return False

    def identity_allows(self, identity: str) -> bool:
        """True when ``identity`` may hold a session (None list = any authenticated identity)."""
        return self.allowed_identities is None or identity in self.allowed_identities

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy of the rules (for ``trustmig guard show --json``)."""
        return asdict(self)
