"""The paper's proposed future work (§8), for comparison: the migration segment between two hosts
through an IKEv2/ESP tunnel (strongSwan).

Each host gets an inner address (``10.77.200.11``...) on its loopback; charon (one per host
namespace, with a private ``/run``) negotiates IKEv2 with a pre-shared key over the migration
network and carries ESP (AES-256-GCM) between the inner addresses. These machines have no
kernel ESP, so the ESP is strongSwan's userspace ``kernel-libipsec`` (a TUN device, ESP in UDP
4500): slower than kernel IPsec would be, which the benchmark states next to its figures.

What a tunnel gives and does not give is in docs/network.md: it encrypts and authenticates the
*hosts'* traffic with host-level keys; it attests no platform, knows no VM, no tenant and no
policy, and every process on either host may use it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from trustmig.netns.topology import NetLab, TopologyError

INNER = "10.77.200"
CHARON = "/usr/lib/ipsec/charon"
_PLUGINS = (
    "random nonce kdf openssl aes gcm sha1 sha2 hmac pem pkcs1 pkcs8 x509 pubkey constraints "
    "revocation curve25519 kernel-libipsec kernel-netlink socket-default vici updown"
)


def inner_ip(lab: NetLab, host: str) -> str:
    return f"{INNER}.{lab.hosts.index(host) + 11}"


@dataclass
class IpsecTunnel:
    """An IKEv2/ESP tunnel between two hosts of a :class:`NetLab` (``up``/``down``)."""

    lab: NetLab
    a: str
    b: str
    workdir: Path

    def _dir(self, host: str) -> Path:
        return self.workdir / f"ipsec-{host}"

    def _conf(self, host: str) -> Path:
        return self._dir(host) / "strongswan.conf"

    def _vici(self, host: str) -> str:
        return f"unix://{self._dir(host) / 'charon.vici'}"

    def up(self, timeout: float = 30.0) -> None:
        """Start both daemons, load the configuration, establish the SA; raises TopologyError
        (after stopping what it started)."""
        if not Path(CHARON).exists():
            raise TopologyError(f"{CHARON} is missing: install strongswan-charon (bootstrap)")
        psk = base64.b64encode(os.urandom(32)).decode()
        try:
            for host in (self.a, self.b):
                self._configure(host, psk)
                self._start(host)
            for host in (self.a, self.b):
                self._swanctl(host, "--load-all", wait_s=timeout)
            self._swanctl(self.a, "--initiate", "--child", "mig", wait_s=timeout)
        except BaseException:
            self.down()
            raise

    def _configure(self, host: str, psk: str) -> None:
        d = self._dir(host)
        for sub in ("x509", "x509ca", "private", "pubkey"):
            (d / "swanctl" / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        peer = self.b if host == self.a else self.a
        ns = self.lab.ns(host)
        _run("ip", "-n", ns, "addr", "replace", f"{inner_ip(self.lab, host)}/32", "dev", "lo")
        self._conf(host).write_text(
            f"charon {{\n  load = {_PLUGINS}\n"
            f"  filelog {{ main {{ path = {d / 'charon.log'}\n default = 1 }} }}\n"
            f"  plugins {{ vici {{ socket = {self._vici(host)} }} }}\n}}\n"
        )
        conf = d / "swanctl" / "swanctl.conf"
        conf.write_text(
            "connections {\n mig {\n  version = 2\n"
            f"  local_addrs = {self.lab.migration_ip(host)}\n"
            f"  remote_addrs = {self.lab.migration_ip(peer)}\n"
            "  proposals = aes256gcm16-prfsha256-x25519\n  encap = yes\n"
            f"  local {{ auth = psk\n id = {host} }}\n  remote {{ auth = psk\n id = {peer} }}\n"
            "  children { mig {\n"
            f"   local_ts = {inner_ip(self.lab, host)}/32\n"
            f"   remote_ts = {inner_ip(self.lab, peer)}/32\n"
            "   mode = tunnel\n   esp_proposals = aes256gcm16\n  } }\n }\n}\n"
            f"secrets {{ ike-mig {{ id-a = {self.a}\n id-b = {self.b}\n secret = 0s{psk} }} }}\n"
        )
        conf.chmod(0o600)

    def _start(self, host: str) -> None:
        d = self._dir(host)
        env = {**os.environ, "STRONGSWAN_CONF": str(self._conf(host))}
        log = (d / "charon.out").open("ab")
        # ip netns exec gives a private mount namespace: a tmpfs /run keeps each charon's pid file
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.ns(host), "sh", "-c",
             f"mount -t tmpfs tmpfs /run && exec {CHARON}"],
            env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        log.close()
        (d / "charon.pid").write_text(str(proc.pid))

    def _swanctl(self, host: str, *args: str, wait_s: float) -> None:
        env = {**os.environ, "STRONGSWAN_CONF": str(self._conf(host)),
               "SWANCTL_DIR": str(self._dir(host) / "swanctl")}  # fmt: skip
        deadline = time.monotonic() + wait_s
        while True:
            argv = ["swanctl", *args, "--uri", self._vici(host)]
            out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=wait_s,
                                 check=False)  # fmt: skip
            if out.returncode == 0:
                return
            if time.monotonic() > deadline:
                last = (out.stderr.strip().splitlines() or out.stdout.strip().splitlines()
                        or ["failed"])[-1]  # fmt: skip
                raise TopologyError(f"swanctl {args[0]} on {host}: {last}")
            time.sleep(0.3)

    def pids(self) -> list[int]:
        out = []
        for host in (self.a, self.b):
            with contextlib.suppress(OSError, ValueError):
                out.append(int((self._dir(host) / "charon.pid").read_text()))
        return out

    def down(self) -> None:
        """Stop both daemons (by the PIDs recorded at start) and drop the inner addresses."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
        deadline = time.monotonic() + 5
        for pid in self.pids():
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                if _alive(pid):
                    os.kill(pid, 9)
        for host in (self.a, self.b):
            (self._dir(host) / "charon.pid").unlink(missing_ok=True)
            with contextlib.suppress(TopologyError):
                _run("ip", "-n", self.lab.ns(host), "addr", "del",
                     f"{inner_ip(self.lab, host)}/32", "dev", "lo")  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return False


def _run(*argv: str) -> None:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=False)
    if out.returncode != 0:
        raise TopologyError(f"{' '.join(argv)}: {out.stderr.strip() or 'failed'}")
