"""A complete trustmig cluster on one machine: CA, hosts, users and real agent processes.

Used by ``trustmig cluster up``, ``trustmig demo``, the benchmarks, the attack lab and the
tests. Each host gets its own state directory (config, credentials, run sockets, logs, audit
database, journal, TPM state) under the cluster directory, and its agent is a separate process
in a session of its own (it outlives the command that started it), so that what crosses between
"hosts" really crosses a socket. ``cluster.json`` in the directory describes the cluster, so a
later command finds it again. Agents are stopped by their own PIDs (checked against their start
time); ``down`` then ends every guest and relay the hosts' journals name, the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustmig.agent.client import ControlClient, ControlError
from trustmig.agent.journal import Journal
from trustmig.agent.provisioning import cluster_attestation_toml, provision_cluster
from trustmig.netns.enter import NetnsError, connect_in, exec_argv
from trustmig.netns.ipsec import INNER, inner_ip
from trustmig.netns.topology import MGMT, MIGRATION, NetLab
from trustmig.pki.authority import ClusterCA, Credentials
from trustmig.pki.tls import client_context
from trustmig.pki.trust import TrustBundle
from trustmig.proc import ProcessRef

CLUSTER_FILE = "cluster.json"
DEFAULT_USER = "alice"


def _inline(d: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + "}"


#: Agents' ports are drawn below the kernel's ephemeral range (32768-60999 by default), so a
#: port chosen at set-up cannot be taken meanwhile by some process's bind(0) or connect().
PORT_RANGE = (20000, 32000)


_last_serial = 0


def _next_serial() -> int:
    """Policy serials that grow across calls and processes (milliseconds, never repeated)."""
    global _last_serial
    _last_serial = max(_last_serial + 1, time.time_ns() // 1_000_000)
    return _last_serial


#: Ports this process has handed out: a port chosen for one agent is free until that agent binds
#: it, so a second draw must never return it again (two hosts of one cluster would collide).
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, outside the ephemeral range, never handed out before by
    this process."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE} on {host}")


@dataclass
class HostHandle:
    name: str
    dir: Path
    config_path: Path
    control: str
    data_listen: str
    data_advertise: str
    proc: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: Python module run as ``python -m MODULE agent ...`` (the lab swaps in compromised agents).
    agent_module: str = "trustmig.cli.main"
    ref: ProcessRef | None = None

    @property
    def pid(self) -> int | None:
        return self.ref.pid if self.ref else (self.proc.pid if self.proc else None)

    @property
    def pid_file(self) -> Path:
        return self.dir / "agent.pid.json"

    def running(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            return False
        return self.ref is not None and self.ref.alive()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "dir": str(self.dir), "config": str(self.config_path),
            "control": self.control, "data_listen": self.data_listen,
            "data_advertise": self.data_advertise, "agent_module": self.agent_module,
        }  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> HostHandle:
        hh = cls(
            doc["name"], Path(doc["dir"]), Path(doc["config"]), doc["control"],
            doc["data_listen"], doc["data_advertise"],
            agent_module=doc.get("agent_module", "trustmig.cli.main"),
        )  # fmt: skip
        with contextlib.suppress(OSError, ValueError, KeyError):
            hh.ref = ProcessRef.from_json(json.loads(hh.pid_file.read_text()))
        return hh


#: the agents' ports in a namespaced cluster (each host has its own addresses there)
NETNS_CONTROL_PORT, NETNS_DATA_PORT = 7100, 7200


class LocalCluster:
    def __init__(
        self, root: Path, hosts: tuple[str, ...] = ("host-a", "host-b"), *, netns: bool = False
    ) -> None:
        self.root = root.resolve()
        self.host_names = hosts
        self.hosts: dict[str, HostHandle] = {}
        self.ca: ClusterCA | None = None
        self.users: dict[str, Path] = {}
        self.tenant_vnis: dict[str, int] = {}
        #: hosts in network namespaces, on separate management, migration and guest networks
        self.netlab: NetLab | None = NetLab.for_cluster(self.root, hosts) if netns else None

    # ----------------------------------------------------------------- set-up
    def setup(
        self,
        *,
        labels: dict[str, dict[str, Any]] | None = None,
        accept_tenants: dict[str, list[str]] | None = None,
        accept_sources: dict[str, list[str]] | None = None,
        qemu_binary: dict[str, str] | None = None,
        data_listen: dict[str, str] | None = None,
        data_advertise: dict[str, str] | None = None,
        extra_config: dict[str, str] | None = None,
        agent_module: dict[str, str] | None = None,
        tenant_vnis: dict[str, int] | None = None,
    ) -> None:
        """``tenant_vnis``: tenant-isolated guest networks on every host (VXLAN over the
        migration network in a namespaced cluster; one namespace's bridges otherwise)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.tenant_vnis = dict(tenant_vnis or {})
        ca_dir = self.root / "ca"
        self.ca = ClusterCA.load(ca_dir) if (ca_dir / "ca.pem").exists() else ClusterCA.init(ca_dir)
        if self.netlab is not None:
            self.netlab.up()
        for h in self.host_names:
            hdir = self.root / h
            hdir.mkdir(parents=True, exist_ok=True)
            self.ca.issue_host(h, hdir / "pki")
            control, default_data = self._addresses(h)
            dl = (data_listen or {}).get(h, default_data)
            da = (data_advertise or {}).get(h, self._advertised_data(h, dl))
            self.hosts[h] = HostHandle(
                h,
                hdir,
                hdir / "host.toml",
                control,
                dl,
                da,
                agent_module=(agent_module or {}).get(h, "trustmig.cli.main"),
            )
        all_labels = {
            h: {"country": "DE", "security_level": 1, **(labels or {}).get(h, {})}
            for h in self.hosts
        }
        for h, hh in self.hosts.items():
            peers = "\n".join(
                f'[peers.{p}]\ncontrol = "{o.control}"\nlabels = {_inline(all_labels[p])}\n'
                f"{self._tunnel_line(p)}{self._underlay_line(p)}"
                for p, o in self.hosts.items()
                if p != h
            )
            lab = all_labels[h]
            lab_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in lab.items())
            (hh.dir / "policies").mkdir(exist_ok=True)
            tenants = (accept_tenants or {}).get(h, ["acme"])
            sources = (accept_sources or {}).get(h, ["*"])
            (hh.dir / "policies" / "host.toml").write_text(
                f'host = "{h}"\n[labels]\n{lab_lines}\n[accept]\n'
                f"sources = {json.dumps(sources)}\ntenants = {json.dumps(tenants)}\n"
                "require_signed_vm_policy = true\n"
            )
            hh.config_path.write_text(
                f'name = "{h}"\nstate_dir = "."\n'
                f'image_cache = "{self.image_cache}"\n'
                f"{(extra_config or {}).get(h, '')}\n"
                f"{cluster_attestation_toml(self.root)}\n"
                f'[control]\nlisten = "{hh.control}"\n\n'
                f'[data]\nlisten = "{hh.data_listen}"\nadvertise = "{hh.data_advertise}"\n\n'
                f'[qemu]\naccel = "auto"\nforward_address = "{self.forward_address(h)}"\n'
                f'binary = "{(qemu_binary or {}).get(h, "qemu-system-x86_64")}"\n\n'
                f"[labels]\n{lab_lines}\n\n{self._network_config()}{self._tenant_config(h)}"
                f"{peers}"
            )

        provision_cluster(self.ca, self.root, [hh.config_path for hh in self.hosts.values()])
        self.save()

    def _advertised_data(self, host: str, listen: str) -> str:
        """A namespaced host listens for data on every address (the migration network and
        the IPsec tunnel's inner one) and advertises its migration address."""
        if self.netlab is None:
            return listen
        return f"{self.netlab.migration_ip(host)}:{NETNS_DATA_PORT}"

    def _underlay_line(self, peer: str) -> str:
        if self.netlab is None or not self.tenant_vnis:
            return ""
        return f'underlay = "{self.netlab.migration_ip(peer)}"\n'

    def _tenant_config(self, host: str) -> str:
        if not self.tenant_vnis:
            return ""
        under = f'underlay = "{self.netlab.migration_ip(host)}"\n' if self.netlab else ""
        return f"[tenant_networks]\nvnis = {_inline(self.tenant_vnis)}\n{under}\n"

    def _tunnel_line(self, peer: str) -> str:
        if self.netlab is None:
            return ""
        return f'tunnel_data = "{inner_ip(self.netlab, peer)}:{NETNS_DATA_PORT}"\n'

    def _network_config(self) -> str:
        """The guard in a namespaced cluster: control from the management network only, data
        from the migration network only, enforced by the kernel too (nftables)."""
        if self.netlab is None:
            return ""
        mgmt, mig, tunnel = f"{MGMT}.0/24", f"{MIGRATION}.0/24", f"{INNER}.0/24"
        listeners = f'{{ control = ["{mgmt}"], data = ["{mig}", "{tunnel}"] }}'
        return (f"[guard]\nallowed_networks = {json.dumps([mgmt, mig, tunnel])}\n"
                f"apply_nftables = true\nlistener_networks = {listeners}\n\n")  # fmt: skip

    def _addresses(self, host: str) -> tuple[str, str]:
        """(control, data) listen addresses: loopback ports, or the host's own addresses on
        the management and migration networks of the namespaced lab."""
        if self.netlab is None:
            return f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        return (f"{self.netlab.mgmt_ip(host)}:{NETNS_CONTROL_PORT}",
                f"0.0.0.0:{NETNS_DATA_PORT}")  # fmt: skip

    # ----------------------------------------------------------------- persistence
    def save(self) -> None:
        doc = {
            "hosts": [hh.to_json() for hh in self.hosts.values()],
            "users": {u: str(d) for u, d in self.users.items()},
            "netns": self.netlab.to_json() if self.netlab else None,
        }
        (self.root / CLUSTER_FILE).write_text(json.dumps(doc, indent=1) + "\n")

    @classmethod
    def load(cls, root: Path) -> LocalCluster:
        """The cluster described by ``root/cluster.json`` (agents found by their PID files)."""
        doc = json.loads((root / CLUSTER_FILE).read_text())
        hosts = [HostHandle.from_json(h) for h in doc["hosts"]]
        c = cls(root, tuple(h.name for h in hosts))
        c.hosts = {h.name: h for h in hosts}
        c.users = {u: Path(d) for u, d in doc.get("users", {}).items()}
        c.ca = ClusterCA.load(c.root / "ca")
        if doc.get("netns"):
            c.netlab = NetLab.from_json(doc["netns"])
        return c

    @staticmethod
    def exists(root: Path) -> bool:
        return (root / CLUSTER_FILE).exists()

    @property
    def image_cache(self) -> Path:
        env = os.environ.get("TRUSTMIG_IMAGE_CACHE")
        if env:
            return Path(env)
        from trustmig.hypervisor.image import default_cache_dir

        return default_cache_dir()

    def add_user(self, name: str, roles: list[str], tenant: str | None = None) -> Path:
        assert self.ca is not None
        d = self.root / "users" / name
        self.ca.issue_user(name, d, roles=roles, tenant=tenant)
        self.users[name] = d
        self.save()
        return d

    def signed_policy(self, user: str, vm: str, **over: Any) -> str:
        """A VM policy signed with ``user``'s key (the VM's owner), as JSON."""
        from trustmig.policy import sign_policy

        p: dict[str, Any] = {
            "tenant": "acme",
            "owner": user,
            "allowed_users": [user],
            "allowed_roles": ["operator"],
            "postcopy": True,
            "max_per_hour": 20,
            "countries": ["DE", "FR"],
            "min_security_level": 1,
            "profile": "strict",
            **over,
        }
        serial = int(over.pop("serial", 0)) or _next_serial()
        text = (
            f'vm = "{vm}"\ntenant = "{p["tenant"]}"\nowner = "{p["owner"]}"\n'
            f"serial = {serial}\n[migrate]\n"
            f"allowed_users = {json.dumps(p['allowed_users'])}\n"
            f"allowed_roles = {json.dumps(p['allowed_roles'])}\n"
            f"postcopy = {str(p['postcopy']).lower()}\nmax_per_hour = {p['max_per_hour']}\n"
            f"[destinations]\ncountries = {json.dumps(p['countries'])}\n"
            f"min_security_level = {p['min_security_level']}\n"
            + "".join(f"{k} = {json.dumps(p[k])}\n" for k in ("hosts", "zones") if k in p)
            + f'[attestation]\nprofile = "{p["profile"]}"\n'
            + _co_residency_toml(p)
        )
        c = self.user_credentials(user)
        return sign_policy(text, "toml", user, c.cert_der(), c.load_key()).to_json()

    # ----------------------------------------------------------------- agents
    def start_agents(self, timeout: float = 60.0) -> None:
        for hh in self.hosts.values():
            self.start_agent(hh.name, wait=False)
        for hh in self.hosts.values():
            self.wait_ready(hh.name, timeout)

    def start_agent(
        self,
        name: str,
        *,
        wait: bool = True,
        timeout: float = 60.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """Start the host's agent in a session of its own (it outlives this process)."""
        hh = self.hosts[name]
        ready = hh.dir / "agent.ready.json"
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        log = (hh.dir / "agent.log").open("ab")
        argv = [sys.executable, "-m", hh.agent_module, "agent", "--config", str(hh.config_path),
                "--ready-file", str(ready), *extra_args]  # fmt: skip
        if self.netlab is not None:
            self.netlab.up()  # again after a reboot or a cluster down
            argv = exec_argv(self.netlab.ns(name), argv)
        hh.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=hh.dir,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        hh.ref = ProcessRef.of(hh.proc.pid)
        hh.pid_file.write_text(json.dumps(hh.ref.to_json()))
        if wait:
            self.wait_ready(name, timeout)

    def start_missing(self, timeout: float = 60.0) -> list[str]:
        """Start the agents that do not run (``cluster up`` on an existing directory)."""
        started = [h for h, hh in self.hosts.items() if not hh.running()]
        for h in started:
            self.start_agent(h, wait=False)
        for h in started:
            self.wait_ready(h, timeout)
        for hh in self.hosts.values():
            if not hh.info:
                with contextlib.suppress(OSError, ValueError):
                    hh.info = json.loads((hh.dir / "agent.ready.json").read_text())
        return started

    def forward_address(self, name: str) -> str:
        """The loopback address a host's guests' forwarded ports bind to: one per host, as
        separate machines would have, so a guest's port is reachable on whichever host runs
        it (127.0.1.1 for the first host, 127.0.1.2 for the second...)."""
        return f"127.0.1.{self.host_names.index(name) + 1}"

    def wait_ready(self, name: str, timeout: float) -> None:
        hh = self.hosts[name]
        ready = hh.dir / "agent.ready.json"
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if not hh.running():
                raise RuntimeError(f"agent {name} exited at start: {self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"agent {name} not ready in {timeout:.0f}s: {self.log_tail(name)}"
                )
            time.sleep(0.05)
        hh.info = json.loads(ready.read_text())

    def log_tail(self, name: str, n: int = 5) -> str:
        try:
            lines = (self.hosts[name].dir / "agent.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-n:])

    def kill_agent(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the host's agent (by PID and start time) and wait until it is gone."""
        hh = self.hosts[name]
        if hh.ref is None or not hh.running():
            return
        hh.ref.signal(sig)
        if hh.proc is not None:
            try:
                hh.proc.wait(30)
            except subprocess.TimeoutExpired:
                hh.ref.kill()
                hh.proc.wait()
        elif not hh.ref.wait_gone(30):
            hh.ref.kill()

    def stop(self) -> None:
        """Stop every agent and end every guest and relay the hosts' journals name."""
        self.down()

    def down(self) -> dict[str, Any]:
        stopped: dict[str, Any] = {}
        for hh in self.hosts.values():
            self.kill_agent(hh.name, signal.SIGTERM)
        for hh in self.hosts.values():
            stopped[hh.name] = self.end_guests(hh.name)
        if self.netlab is not None:
            self.netlab.down()
        return stopped

    def end_guests(self, name: str) -> list[int]:
        """Kill the QEMUs and relays a host's journal names, in its VMs and its migrations (only
        those very processes)."""
        path = self.hosts[name].dir / "journal.db"
        if not path.exists():
            return []
        journal = Journal(path)
        refs: list[ProcessRef] = []
        try:
            for vm in journal.vms():
                ref = ProcessRef.from_json(vm.runtime.get("process"))
                if ref is not None:
                    refs.append(ref)
            for m in journal.migrations(limit=100000):
                ctx = m.context or {}
                relay = ctx.get("relay") or {}
                for doc in (relay.get("process"), ctx.get("qemu_process")):
                    ref = ProcessRef.from_json(doc)
                    if ref is not None:
                        refs.append(ref)
        finally:
            journal.close()
        killed = [r.pid for r in refs if r.alive()]
        for r in refs:
            r.kill()
        return killed

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def summary(self, user: str = DEFAULT_USER) -> dict[str, Any]:
        """``cluster up --json``: hosts with their control address, agent PID and state dir."""
        return {
            "hosts": [
                {"name": hh.name, "control": hh.control, "pid": hh.pid if hh.running() else None,
                 "state_dir": str(hh.dir), "running": hh.running()}
                for hh in self.hosts.values()
            ],
            "credentials": str(self.users.get(user, self.root / "users" / user)),
            "state_dir": str(self.root),
            "netns": {"namespaces": self.netlab.namespaces, "admin": self.netlab.ns("admin"),
                      "client": self.netlab.ns("client")} if self.netlab else None,
        }  # fmt: skip

    # ----------------------------------------------------------------- clients
    def user_credentials(self, user: str) -> Credentials:
        return Credentials.in_dir(self.users[user], "user")

    async def client(self, host: str, user: str) -> ControlClient:
        """A control connection to ``host`` as ``user`` (from the admin namespace, in a
        namespaced cluster: the root namespace never sends to the lab's addresses)."""
        c = self.user_credentials(user)
        bundle = TrustBundle.load(c.ca_path, c.crl_path if c.crl_path.exists() else None)
        address, sock = self.hosts[host].control, None
        if self.netlab is not None:
            ip, port = address.rsplit(":", 1)
            try:
                sock = await asyncio.to_thread(connect_in, self.netlab.ns("admin"), ip, int(port))
            except (OSError, NetnsError) as e:
                raise ControlError(f"cannot reach agent at {address}: {e}", "transport") from None
        return await ControlClient.connect(address, client_context(c, bundle), sock=sock)

    async def guard_counters(self, host: str, user: str) -> dict[str, int]:
        """The rule hit counters of ``host``'s guard (``trustmig guard show``)."""
        c = await self.client(host, user)
        try:
            res = await c.call("guard.show", timeout=30)
            return {str(k): int(v) for k, v in res["guard"]["counters"].items()}
        finally:
            await c.close()


def _co_residency_toml(p: dict[str, Any]) -> str:
    """``neighbours`` and ``never_with_tenants`` of a test policy, when given."""
    lines = [f"{k} = {json.dumps(p[k])}\n" for k in ("neighbours", "never_with_tenants") if k in p]
    return "[co_residency]\n" + "".join(lines) if lines else ""
