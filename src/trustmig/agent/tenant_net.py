"""Tenant-isolated guest networks on this host: a bridge per tenant, VXLAN to the peers, and
kernel rules that keep tenants apart.

Each tenant of ``[tenant_networks] vnis`` gets bridge ``tvb<VNI>`` on every host. A guest's NIC
with ``backend = { kind = "tenant" }`` is a tap named ``tv<VNI>_...`` on its tenant's bridge, and
the bridge reaches the same tenant's bridge on every peer through VXLAN ``tv<VNI>_vx`` over the
underlay (BUM traffic to every peer, unicast learnt). After a migration the destination's QEMU
announces the guest, so the peers' VXLAN learns where it runs now.

The rules (nftables, this namespace, replaced at every start and kept at the stop so that
guests left running stay apart):

- **bridge forward.** A frame from a port of tenant T may leave only by a port of T, and a
  port of T receives only from ports of T. A tap of another tenant (or a stray device) on T's
  bridge reaches nobody.
- **inet input and forward.** Nothing from a tenant bridge reaches the host or is routed by
  it into another network, so two tenants cannot meet through the host either. (With
  ``br_netfilter`` bridged frames cross the forward hook too, in and out of the same bridge:
  those pass.)
- **VXLAN.** Accepted only from the peers' underlay addresses, so no one else can inject frames
  into a segment.

A peer this host quarantines leaves the fabric: its flood entries are removed and its underlay
address leaves the rules, so it neither receives the tenants' broadcast nor injects frames, until
the quarantine is lifted (:meth:`TenantNetworks.sync`, every few seconds).
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from trustmig.config import HostConfig
from trustmig.guard.nft import apply_nft
from trustmig.hypervisor.devices import HostCannotRun, tenant_bridge, tenant_port_prefix

log = logging.getLogger(__name__)
TABLE = "trustmig_tenants"


def render_tenant_nft(vnis: dict[str, int], peers: list[str], port: int,
                      vxlan: bool) -> str:  # fmt: skip
    """The rules for these tenants' segments (pure)."""
    forward, routed = [], []
    for tenant, vni in sorted(vnis.items(), key=lambda kv: kv[1]):
        p, br = tenant_port_prefix(vni), tenant_bridge(vni)
        # with br_netfilter, bridged frames pass here too, in and out of the same bridge:
        # only what the host would route into or out of a segment is dropped
        routed += [f'\t\tiifname "{br}" oifname != "{br}" counter drop',
                   f'\t\toifname "{br}" iifname != "{br}" counter drop']  # fmt: skip
        forward += [
            f'\t\tiifname "{p}*" oifname != "{p}*" counter drop comment "{tenant} out"',
            f'\t\toifname "{p}*" iifname != "{p}*" counter drop comment "{tenant} in"',
        ]
    vx = []
    if vxlan:
        allowed = ", ".join(peers)
        vx = [f"\t\tudp dport {port} ip saddr != {{ {allowed} }} counter drop" if peers
              else f"\t\tudp dport {port} counter drop"]  # fmt: skip
    return "\n".join([
        "# trustmig tenant networks",
        f"table bridge {TABLE}", f"delete table bridge {TABLE}", f"table bridge {TABLE} {{",
        "\tchain forward {", "\t\ttype filter hook forward priority 0; policy accept;",
        *forward, "\t}", "}",
        f"table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{",
        "\tchain input {", "\t\ttype filter hook input priority 0; policy accept;",
        '\t\tiifname "tvb*" counter drop', *vx, "\t}",
        "\tchain forward {", "\t\ttype filter hook forward priority 0; policy accept;",
        *routed, "\t}", "}", "",
    ])  # fmt: skip


class TenantNetworks:
    """Creates the segments and loads the rules (root, in the host's namespace)."""

    def __init__(self, cfg: HostConfig) -> None:
        self.settings = cfg.tenant_networks
        #: peer host -> its underlay address
        self.underlays = {h: p.underlay for h, p in sorted(cfg.peers.items()) if p.underlay}
        self.peers = sorted(self.underlays.values())
        self.in_fabric: frozenset[str] = frozenset(self.underlays)

    @property
    def enabled(self) -> bool:
        return bool(self.settings.vnis)

    def apply(self) -> None:
        """Every configured tenant's bridge (and VXLAN), then the rules. Raises HostCannotRun
        naming the command that failed."""
        if not self.enabled:
            return
        for tenant, vni in sorted(self.settings.vnis.items()):
            self._segment(vni)
            log.info("tenant %s: segment %s (VNI %d)", tenant, tenant_bridge(vni), vni)
        self._rules()

    def _rules(self) -> None:
        vxlan = self.settings.underlay is not None
        trusted = sorted(self.underlays[h] for h in self.in_fabric)
        apply_nft(render_tenant_nft(self.settings.vnis, trusted, self.settings.port, vxlan))

    def sync(self, quarantined: set[str]) -> bool:
        """Keep quarantined peers out of the fabric; whether anything changed."""
        if not self.enabled or self.settings.underlay is None:
            return False
        wanted = frozenset(h for h in self.underlays if h not in quarantined)
        if wanted == self.in_fabric:
            return False
        for vni in self.settings.vnis.values():
            vx = tenant_port_prefix(vni) + "vx"
            for h in self.in_fabric - wanted:
                _fdb("del", vx, self.underlays[h])
            for h in wanted - self.in_fabric:
                _fdb("append", vx, self.underlays[h])
        left, back = sorted(self.in_fabric - wanted), sorted(wanted - self.in_fabric)
        self.in_fabric = wanted
        self._rules()
        log.warning("tenant networks: %s", "; ".join(
            [*(f"{h} left the fabric (quarantined)" for h in left),
             *(f"{h} rejoined the fabric" for h in back)]))  # fmt: skip
        return True

    def _segment(self, vni: int) -> None:
        br = tenant_bridge(vni)
        if not Path(f"/sys/class/net/{br}").exists():
            _ip("link", "add", br, "type", "bridge")
        _no_ipv6(br)
        _ip("link", "set", br, "up")
        if self.settings.underlay is None:
            return  # one namespace: the bridge itself spans every agent here
        vx = tenant_port_prefix(vni) + "vx"
        if not Path(f"/sys/class/net/{vx}").exists():
            _ip("link", "add", vx, "type", "vxlan", "id", str(vni), "local",
                self.settings.underlay, "dstport", str(self.settings.port))  # fmt: skip
        _no_ipv6(vx)
        _ip("link", "set", vx, "master", br, "up")
        for host in sorted(self.in_fabric):  # flooding to every peer; unicast is learnt
            _fdb("append", vx, self.underlays[host])


def _fdb(action: str, vx: str, peer: str) -> None:
    """Add or remove the all-zero (flood) entry towards ``peer``; "exists" / "missing" are fine."""
    subprocess.run(["bridge", "fdb", action, "00:00:00:00:00:00", "dev", vx, "dst", peer],
                   capture_output=True, timeout=10, check=False)  # fmt: skip


def _no_ipv6(dev: str) -> None:
    knob = Path(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6")
    if knob.exists():
        knob.write_text("1")


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise HostCannotRun(f"tenant networks: ip {' '.join(args)}: {last}")
