"""Inter-VM attack: a malicious guest on the victim's host scans and connects to the victim
guest's open port (the paper's §6.1 and §7.4: "the VMs running on same machine can communicate
with each other").

The victim's guest serves its secret on TCP port 7000. The baseline puts every guest on one
shared bridge, as a plain QEMU host does: the attacker's guest connects and reads the secret.
trustmig puts each guest on its tenant's own segment (a bridge per tenant, kernel rules between
ports): the attacker's guest reaches nothing, while a guest of the victim's own tenant still
reads the service (so the service was there to be found). Measured by the bytes the attacker's
guest received. Both run in network namespaces the attack creates and removes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Any

from trustmig.agent.client import ControlClient
from trustmig.agent.local_cluster import LocalCluster
from trustmig.hypervisor.devices import HostNet
from trustmig.hypervisor.spec import VMSpec
from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.targets import EVE, OWNER, TENANT, LabEnv

NAME = "inter-vm"
PORT = 7000
VICTIM_IP, ATTACKER_IP, FRIEND_IP = "10.77.9.21", "10.77.9.22", "10.77.9.23"
MACS = {VICTIM_IP: "52:54:00:77:09:21", ATTACKER_IP: "52:54:00:77:09:22",
        FRIEND_IP: "52:54:00:77:09:23"}  # fmt: skip


def guest(name: str, tenant: str, ip: str, backend: dict[str, Any], serve: bool) -> VMSpec:
    workload: dict[str, Any] = {"mem_mib": 8, "addresses": {"n0": f"{ip}/24"}}
    if serve:
        workload["serve_port"] = PORT
    return VMSpec.model_validate({
        "name": name, "tenant": tenant, "memory_mib": 96, "workload": workload,
        "nics": [{"id": "n0", "mac": MACS[ip], "backend": backend}],
    })  # fmt: skip


def _parse(line: str) -> tuple[str, int]:
    words = line.split()
    got = next((int(w[6:]) for w in words if w.startswith("bytes=")), 0)
    return (words[2] if len(words) > 2 else "error"), got


async def baseline(env: LabEnv) -> Outcome:
    ns = f"tm{os.getpid() % 100000}-shared"
    run = ["ip", "netns"]
    subprocess.run([*run, "add", ns], check=True, capture_output=True, timeout=20)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "br-shared", "type", "bridge"],
                       check=True, capture_output=True, timeout=20)  # fmt: skip
        subprocess.run(["ip", "-n", ns, "link", "set", "br-shared", "up"], check=True,
                       capture_output=True, timeout=20)  # fmt: skip
        net = HostNet(netns=ns)
        shared = {"kind": "bridge", "bridge": "br-shared"}
        b = env.baseline
        victim = await b.boot_spec(guest(f"{NAME}-victim", TENANT, VICTIM_IP, shared, True), net)
        attacker = await b.boot_spec(guest(f"{NAME}-attacker", "evil", ATTACKER_IP, shared,
                                           False), net)  # fmt: skip
        line = await attacker.console.command(f"connect {VICTIM_IP} {PORT}", "NET ", 30)
        result, got = _parse(line)
        for vm in (victim, attacker):
            with contextlib.suppress(Exception):
                await vm.kill()
    finally:
        subprocess.run([*run, "del", ns], capture_output=True, timeout=20, check=False)
    return Outcome(
        compromised=got > 0,
        outcome=f"the attacker's guest connected to the victim's port {PORT} on the shared "
        f"bridge and read {got} bytes of its secret ({result})",
        evidence={"probe": result, "bytes_received": got, "network": "one shared bridge"},
    )


async def _probe(c: ControlClient, vm: str, ip: str) -> tuple[str, int]:
    r = await c.call("vm.probe", {"name": vm, "address": ip, "port": PORT}, timeout=60)
    return str(r["result"]), int(r["bytes"])


async def trustmig(env: LabEnv) -> Outcome:
    cluster = LocalCluster(env.workdir / "tenant-networks", ("host-a",), netns=True)
    try:
        cluster.setup(accept_tenants={"host-a": [TENANT, "evil"]},
                      tenant_vnis={TENANT: 101, "evil": 102},
                      extra_config={"host-a": "capacity = {vcpus = 8}"})  # fmt: skip
        cluster.add_user(OWNER, ["owner", "operator"], tenant=TENANT)
        cluster.add_user(EVE, ["owner", "operator"], tenant="evil")
        cluster.start_agents()
        alice, eve = await cluster.client("host-a", OWNER), await cluster.client("host-a", EVE)
        try:
            own = {"kind": "tenant"}
            for c, user, spec in (
                (alice, OWNER, guest(f"{NAME}-victim", TENANT, VICTIM_IP, own, True)),
                (alice, OWNER, guest(f"{NAME}-friend", TENANT, FRIEND_IP, own, False)),
                (eve, EVE, guest(f"{NAME}-attacker", "evil", ATTACKER_IP, own, False)),
            ):
                policy = cluster.signed_policy(user, spec.name, tenant=spec.tenant,
                                               allowed_users=[user])  # fmt: skip
                await c.call("vm.start", {"spec": spec.model_dump(mode="json",
                                                                  exclude={"owner"}),
                                          "policy": policy}, timeout=300)  # fmt: skip
            attack = await _probe(eve, f"{NAME}-attacker", VICTIM_IP)
            friend = await _probe(alice, f"{NAME}-friend", VICTIM_IP)
        finally:
            await alice.close()
            await eve.close()
    finally:
        cluster.stop()
    return Outcome(
        compromised=attack[1] > 0,
        outcome=f"the attacker's guest reached nothing ({attack[0]}, {attack[1]} bytes); a "
        f"guest of the victim's tenant read {friend[1]} bytes from the same port",
        evidence={
            "probe": attack[0],
            "bytes_received": attack[1],
            "same_tenant_probe": friend[0],
            "same_tenant_bytes": friend[1],
            "network": "a segment per tenant, kernel rules between ports",
        },
    )


ATTACK = Attack(
    name=NAME,
    title="Inter-VM attack on a shared host",
    paper="VMs on the same machine can communicate with each other; without a policy for that "
    "communication, a malicious VM attacks another VM running on the same machine.",
    x805=(
        ("access_control", "infrastructure", "end_user"),
        ("communication_security", "infrastructure", "end_user"),
        ("data_confidentiality", "infrastructure", "end_user"),
        ("privacy", "infrastructure", "end_user"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
