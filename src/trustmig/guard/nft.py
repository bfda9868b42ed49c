"""Render :class:`GuardRules` as an nftables ruleset, the kernel-level first line of the guard.

The kernel drops unlisted peers and per-source floods before they reach user space, so the
Python guard only sees traffic that already passed the cheapest filters. The output is a
complete ``nft -f`` script that atomically replaces the ``inet`` table (IPv4 and IPv6).
"""

from __future__ import annotations

import math
import re

from trustmig.guard.errors import InvalidRulesError
from trustmig.guard.rules import GuardRules

_TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_UNITS = (("second", 1.0), ("minute", 60.0), ("hour", 3600.0), ("day", 86400.0))


def nft_rate(per_second: float) -> tuple[str, int]:
    """An integer nft ``limit rate`` (``N/unit``) and burst (2x) for a float per-second rate.

    nft only takes integer rates, so fractional rates move to a longer unit (0.5/s -> 30/minute).
    """
    if not math.isfinite(per_second) or per_second <= 0:
        raise InvalidRulesError(
            f"max_conn_rate_per_peer is {per_second!r}; it must be a positive number"
        )
    for unit, seconds in _UNITS:
        amount = per_second * seconds
        if amount >= 1 and (abs(amount - round(amount)) < 1e-9 or unit == "day"):
            count = max(1, round(amount))
            return f"{count}/{unit}", max(1, math.ceil(2 * count))
    count = max(1, round(per_second * 86400))  # pragma: no cover - loop returns at "day"
    return f"{count}/day", 2 * count


def _check_port(name: str, port: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidRulesError(f"{name} is {port!r}; it must be a TCP port 1..65535")


def render_nft(
    rules: GuardRules, *, control_port: int, data_port: int, table: str = "trustmig"
) -> str:
    """nft script: allowed-peer sets, per-source rate meter, counted drop for the two ports.

    Traffic to other ports is left alone (policy accept): the table only guards trustmig's
    listeners and never locks an administrator out of the host.
    """
    _check_port("control_port", control_port)
    _check_port("data_port", data_port)
    if not _TABLE_RE.match(table):
        raise InvalidRulesError(
            f"table name {table!r} is invalid; use letters, digits and _ (max 32, letter first)"
        )
    v4 = [str(n) for n in rules.networks if n.version == 4]
    v6 = [str(n) for n in rules.networks if n.version == 6]
    rate, burst = nft_rate(rules.max_conn_rate_per_peer)
    ports = f"{{ {control_port}, {data_port} }}" if control_port != data_port else str(control_port)

    def addr_set(name: str, kind: str, elements: list[str]) -> list[str]:
        lines = [f"\tset {name} {{", f"\t\ttype {kind}", "\t\tflags interval"]
        if elements:
            lines.append(f"\t\telements = {{ {', '.join(elements)} }}")
        return [*lines, "\t}"]

    def meter_set(name: str, kind: str) -> list[str]:
        return [
            f"\tset {name} {{",
            f"\t\ttype {kind}",
            "\t\tsize 65535",
            "\t\tflags dynamic,timeout",
            "\t\ttimeout 1m",
            "\t}",
        ]

    lines = [
        f"# trustmig guard: control port {control_port}, data port {data_port}",
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        *addr_set("allowed_v4", "ipv4_addr", v4),
        *addr_set("allowed_v6", "ipv6_addr", v6),
        *meter_set("rate_v4", "ipv4_addr"),
        *meter_set("rate_v6", "ipv6_addr"),
        "\tcounter accepted_new {",
        "\t}",
        "\tcounter dropped {",
        "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        "\t\tct state established,related accept",
        f"\t\ttcp dport {ports} ct state new ip saddr @allowed_v4 "
        f"update @rate_v4 {{ ip saddr limit rate {rate} burst {burst} packets }} "
        'counter name "accepted_new" accept',
        f"\t\ttcp dport {ports} ct state new ip6 saddr @allowed_v6 "
        f"update @rate_v6 {{ ip6 saddr limit rate {rate} burst {burst} packets }} "
        'counter name "accepted_new" accept',
        f'\t\ttcp dport {ports} counter name "dropped" drop',
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"
