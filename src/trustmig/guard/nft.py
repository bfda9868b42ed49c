"""Render :class:`GuardRules` as an nftables ruleset, the kernel-level first line of the guard.

The kernel drops unlisted peers and per-source floods before they reach user space, so the
Python guard only sees traffic that already passed the cheapest filters. The output is a
complete ``nft -f`` script that atomically replaces the ``inet`` table (IPv4 and IPv6).
"""

from __future__ import annotations

import math
import re
import subprocess

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
    """nft script: allowed-peer sets, a per-source rate meter on the control port, counted
    drop for both ports.

    Traffic to other ports is left alone (policy accept): the table only guards trustmig's
    listeners and never locks an administrator out of the host. With ``listener_networks``
    each port accepts only its own networks (management for control, migration for data).
    """
    _check_port("control_port", control_port)
    _check_port("data_port", data_port)
    if not _TABLE_RE.match(table):
        raise InvalidRulesError(
            f"table name {table!r} is invalid; use letters, digits and _ (max 32, letter first)"
        )
    rate, burst = nft_rate(rules.max_conn_rate_per_peer)
    ports = f"{{ {control_port}, {data_port} }}" if control_port != data_port else str(control_port)
    # one allow-list for both ports, or one per port when a listener has networks of its own
    per_port = rules.listener_networks and control_port != data_port
    groups = (
        [("control", str(control_port), rules.networks_for("control")),
         ("data", str(data_port), rules.networks_for("data"))]
        if per_port else [("allowed", ports, rules.networks)]
    )  # fmt: skip

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

    sets: list[str] = []
    for name, _dport, nets in groups:
        sets += addr_set(f"{name}_v4", "ipv4_addr", [str(n) for n in nets if n.version == 4])
        sets += addr_set(f"{name}_v6", "ipv6_addr", [str(n) for n in nets if n.version == 6])
    control_set = groups[0][0]
    data_set = groups[-1][0]
    meter = f"limit rate {rate} burst {burst} packets"
    accepts: list[str] = []
    for family, saddr in (("v4", "ip saddr"), ("v6", "ip6 saddr")):
        accepts.append(
            f"\t\ttcp dport {control_port} ct state new {saddr} @{control_set}_{family} "
            f'update @rate_{family} {{ {saddr} {meter} }} counter name "accepted_new" accept'
        )
    if control_port != data_port:
        # no per-source meter on the data port: peers, NATed guests and a flood share source
        # addresses, so the kernel would drop a real peer's SYN with the flood's. The agent's
        # gate makes a bogus connection cost one accept and one read instead.
        for family, saddr in (("v4", "ip saddr"), ("v6", "ip6 saddr")):
            accepts.append(
                f"\t\ttcp dport {data_port} ct state new {saddr} @{data_set}_{family} "
                'counter name "accepted_new" accept'
            )
    lines = [
        f"# trustmig guard: control port {control_port}, data port {data_port}",
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        *sets,
        *meter_set("rate_v4", "ipv4_addr"),
        *meter_set("rate_v6", "ipv6_addr"),
        "\tcounter accepted_new {",
        "\t}",
        "\tcounter dropped {",
        "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        "\t\tct state established,related accept",
        *accepts,
        f'\t\ttcp dport {ports} counter name "dropped" drop',
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def apply_nft(script: str) -> None:
    """Load ``script`` into the kernel (this network namespace); raises InvalidRulesError."""
    out = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True,
                         timeout=30, check=False)  # fmt: skip
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise InvalidRulesError(f"nft refused the guard's rules: {last}")


def remove_nft(table: str = "trustmig") -> None:
    """Drop the guard's table (nothing happens if it is not there)."""
    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, timeout=30,
                   check=False)  # fmt: skip
