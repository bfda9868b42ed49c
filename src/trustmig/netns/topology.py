"""A lab of hosts in network namespaces, wired like a small data centre.

One *switch* namespace holds three bridges, one per network, and every other namespace has a
veth port on the bridges it belongs to:

=============  =================  =========================================================
network        addresses          who is on it
=============  =================  =========================================================
management     10.77.1.0/24       each host's agent (control API, ``.11``, ``.12``...), the
                                  admin namespace (``.250``) where the CLI runs
migration      10.77.2.0/24       each host's data channel (``.11``, ``.12``...)
guest          10.77.3.0/24       each host's guest bridge ``br-guest`` (layer 2 only: hosts
                                  have no address there), the guests (``.101``...), the client
                                  namespace (``.250``)
=============  =================  =========================================================

An *attacker* namespace sits on the migration network (``.66``, no certificate), for the lab's
attacks from the segment; a wiretap listens on a host's switch port (``switch_port``).

The switch also routes between the three networks (``.1`` on each), as a data centre's core
router without filters would: isolation is the hosts' own job (the agents' nftables rules), and
a client or guest that tries the agents' ports is stopped there, by the kernel.

Because the guest bridges of all hosts meet in the switch's guest bridge, a guest keeps its MAC
and IP on whichever host it runs (the switch learns its new port from QEMU's announcement after
a migration). Namespaces are named ``tm<tag>-<role>``; the tag comes from the cluster directory,
so two clusters never share a namespace. The networks exist only inside the namespaces: nothing
here routes to or from the root namespace.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MGMT, MIGRATION, GUEST = "10.77.1", "10.77.2", "10.77.3"
GUEST_BRIDGE = "br-guest"
_BRIDGES = {"mgmt": "brm", "mig": "brx", "guest": "brg"}
_SUBNETS = {"mgmt": MGMT, "mig": MIGRATION, "guest": GUEST}


class TopologyError(Exception):
    """A namespace, link or address could not be set up (names the command and its error)."""


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise TopologyError(f"ip {' '.join(args)}: {last}")


def _sysctl(ns: str, setting: str) -> None:
    out = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", setting],
                         capture_output=True, text=True, timeout=20, check=False)  # fmt: skip
    if out.returncode != 0:
        raise TopologyError(f"sysctl {setting} in {ns}: {out.stderr.strip() or 'failed'}")


def existing_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10,
                         check=False)  # fmt: skip
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@dataclass(frozen=True)
class NetLab:
    """The namespaces and addresses of one cluster's lab (``up`` builds it, ``down`` removes it)."""

    tag: str
    hosts: tuple[str, ...]

    @classmethod
    def for_cluster(cls, root: Path, hosts: tuple[str, ...]) -> NetLab:
        return cls(hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:6], hosts)

    def to_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "hosts": list(self.hosts)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> NetLab:
        return cls(str(doc["tag"]), tuple(doc["hosts"]))

    # ------------------------------------------------------------------ names and addresses
    def ns(self, role: str) -> str:
        """Namespace of a host (its name), or of ``switch``, ``admin``, ``client``."""
        return f"tm{self.tag}-{role}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns("switch"), *(self.ns(h) for h in self.hosts), self.ns("admin"),
                self.ns("client"), self.ns("attacker")]  # fmt: skip

    def _index(self, host: str) -> int:
        return self.hosts.index(host) + 11

    def mgmt_ip(self, host: str) -> str:
        return f"{MGMT}.{self._index(host)}"

    def migration_ip(self, host: str) -> str:
        return f"{MIGRATION}.{self._index(host)}"

    @staticmethod
    def guest_ip(n: int) -> str:
        """The guest network address of the n-th guest (n >= 1)."""
        if not 1 <= n <= 140:
            raise TopologyError(f"guest number {n} is out of range: use 1-140")
        return f"{GUEST}.{100 + n}"

    admin_ip = f"{MGMT}.250"
    client_ip = f"{GUEST}.250"
    #: the lab's attacker sits on the migration network (a stranger there: no certificate)
    attacker_ip = f"{MIGRATION}.66"

    @staticmethod
    def switch_port(host_index: int, network: str) -> str:
        """The switch's end of a host's link (host_index from 1): where a wiretap listens."""
        return {"mgmt": "m", "mig": "x", "guest": "g"}[network] + str(host_index)

    # ------------------------------------------------------------------ life cycle
    def exists(self) -> bool:
        return set(self.namespaces) <= existing_namespaces()

    def up(self) -> None:
        """Build every namespace, bridge and link (a partial lab is removed first); raises
        TopologyError and then leaves nothing behind."""
        if self.exists():
            return
        self.down()
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def down(self) -> list[str]:
        """Delete the lab's namespaces (their links go with them); the deleted ones."""
        gone = []
        have = existing_namespaces()
        for ns in self.namespaces:
            if ns in have:
                _ip("netns", "delete", ns)
                gone.append(ns)
        return gone

    def _build(self) -> None:
        for ns in self.namespaces:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        sw = self.ns("switch")
        for network, br in _BRIDGES.items():
            _ip("-n", sw, "link", "add", br, "type", "bridge", "forward_delay", "0")
            _ip("-n", sw, "addr", "add", f"{_SUBNETS[network]}.1/24", "dev", br)
            _ip("-n", sw, "link", "set", br, "up")
        _sysctl(sw, "net.ipv4.ip_forward=1")
        for i, h in enumerate(self.hosts, start=1):
            ns = self.ns(h)
            self._port(ns, "mgmt0", "mgmt", self.switch_port(i, "mgmt"), f"{self.mgmt_ip(h)}/24")
            self._port(ns, "mig0", "mig", self.switch_port(i, "mig"),
                       f"{self.migration_ip(h)}/24")  # fmt: skip
            _ip("-n", ns, "link", "add", GUEST_BRIDGE, "type", "bridge", "forward_delay", "0")
            _ip("-n", ns, "link", "set", GUEST_BRIDGE, "up")
            self._port(ns, "guplink", "guest", self.switch_port(i, "guest"), None)
            _ip("-n", ns, "link", "set", "guplink", "master", GUEST_BRIDGE)
            _ip("-n", ns, "route", "add", "default", "via", f"{MGMT}.1")
        self._port(self.ns("admin"), "mgmt0", "mgmt", "madmin", f"{self.admin_ip}/24")
        _ip("-n", self.ns("admin"), "route", "add", "default", "via", f"{MGMT}.1")
        self._port(self.ns("client"), "eth0", "guest", "gclient", f"{self.client_ip}/24")
        _ip("-n", self.ns("client"), "route", "add", "default", "via", f"{GUEST}.1")
        self._port(self.ns("attacker"), "eth0", "mig", "xattack", f"{self.attacker_ip}/24")

    def _port(self, ns: str, inner: str, network: str, outer: str, cidr: str | None) -> None:
        """A veth from ``ns`` (named ``inner``) into the switch's bridge of ``network``."""
        sw = self.ns("switch")
        _ip("link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", sw)
        _ip("-n", sw, "link", "set", outer, "master", _BRIDGES[network])
        _ip("-n", sw, "link", "set", outer, "up")
        if cidr is not None:
            _ip("-n", ns, "addr", "add", cidr, "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
