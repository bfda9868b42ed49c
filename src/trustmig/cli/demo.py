"""`trustmig demo`: two agents (on loopback, or in network namespaces), one guest, one live
migration, measured.

Runs the real thing end to end: a cluster CA, two enrolled hosts with their own state dirs, two
agent processes, a guest booted on the first host with its workload running, and a migration to
the second host through the secure channel while the guest keeps working. The result reports
QEMU's figures next to what the guest itself shows (heartbeat gap, sequence continuity, memory
self-check); with ``--netns --guest debian``, also what the guest's clients saw: an ssh session
and a TCP echo stream from the client namespace, through the migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustmig.agent.client import ControlClient, ControlError
from trustmig.agent.local_cluster import LocalCluster
from trustmig.hypervisor.debian import (
    DebianImage,
    build_debian_image,
    create_overlay,
    debian_definition,
    guest_ssh,
    ssh_argv,
    wait_for_ssh,
)
from trustmig.hypervisor.heartbeat import analyse
from trustmig.hypervisor.image import build_image
from trustmig.hypervisor.measure import kernel_text_region
from trustmig.netns.clients import ECHO_PORT, ECHO_SERVER, SSH_LOOP, ClientProbe
from trustmig.netns.topology import GUEST_BRIDGE, NetLab

SOURCE, DEST = "host-a", "host-b"
USER = "alice"
GUEST_IP = NetLab.guest_ip(1)


class DemoError(ValueError):
    """The demo's options do not fit together (one line, says which)."""


SSH_PORT = 2222


class DebianGuest:
    """The demo's real OS: booted from its definition, logged in to over ssh before and after
    the migration (the same process and the same file must be there)."""

    def __init__(self, cluster: LocalCluster, image: DebianImage) -> None:
        self.cluster = cluster
        self.image = image
        self.pid = ""
        self.digest = ""
        #: in namespaces the guest is on the guest network and its clients in the client
        #: namespace; on loopback ssh goes through each host's forwarded port
        lab = cluster.netlab
        self.netns = lab.ns("client") if lab is not None else None
        self.probe: ClientProbe | None = None

    def _address(self, host: str) -> tuple[str, int]:
        if self.netns is not None:
            return GUEST_IP, 22
        return self.cluster.forward_address(host), SSH_PORT

    def definition(self, workload: dict[str, Any], memory: int, measure: bool) -> dict[str, Any]:
        shared = self.cluster.root / "shared"  # storage both hosts see
        shared.mkdir(exist_ok=True)
        disk = shared / "demo-vm.qcow2"
        disk.unlink(missing_ok=True)
        create_overlay(self.image, disk)
        # the OS itself needs about 256 MiB next to the workload
        net = (GUEST_BRIDGE, f"{GUEST_IP}/24") if self.netns is not None else None
        d = debian_definition("demo-vm", self.image, disk, ssh_port=SSH_PORT,
                              memory_mib=memory + 256, workload=workload,
                              measure_kernel=measure, guest_net=net)  # fmt: skip
        return {**d, "tenant": "acme"}

    def _ssh(self, host: str, cmd: str) -> str | None:
        address, port = self._address(host)
        res = guest_ssh(self.image, address, port, cmd, netns=self.netns)
        return res.stdout.strip() if res.ok else None

    def before(self) -> str | None:
        """Log in, start a long-running process, write a file (and, in namespaces, connect
        the clients); an error line or None."""
        address, port = self._address(SOURCE)
        login = wait_for_ssh(self.image, address, port, netns=self.netns)
        if not login.ok:
            return f"ssh to the guest on {SOURCE} failed: {login.stderr}"
        self.pid = self._ssh(SOURCE, "nohup sleep 100000 >/dev/null 2>&1 & echo $!") or ""
        self.digest = self._ssh(SOURCE, "head -c 8M /dev/urandom > demo.bin && sync && "
                                "sha256sum demo.bin") or ""  # fmt: skip
        if not (self.pid and self.digest):
            return "could not prepare the guest over ssh"
        if self.netns is not None:
            self._ssh(SOURCE, ECHO_SERVER % ECHO_PORT)
            loop = ssh_argv(self.image, address, port, SSH_LOOP, self.netns)
            self.probe = ClientProbe(self.netns, GUEST_IP, loop)
            self.probe.start()
        return None

    def after(self) -> dict[str, Any]:
        clients = self.probe.stop().to_json() if self.probe is not None else None
        address, port = self._address(DEST)
        login = wait_for_ssh(self.image, address, port, 60, netns=self.netns)
        cmdline = self._ssh(DEST, f"tr '\\0' ' ' < /proc/{self.pid}/cmdline") if login.ok else None
        digest = self._ssh(DEST, "sha256sum demo.bin") if login.ok else None
        out: dict[str, Any] = {
            "ssh_after_migration": login.ok,
            "guest_process_survived": (cmdline or "").strip() == "sleep 100000",
            "guest_process_pid": int(self.pid) if self.pid.isdigit() else None,
            "disk_digest_match": bool(digest) and digest == self.digest,
        }
        if clients is not None:
            out["clients"] = clients
            out.update({k: clients[k] for k in ("client_session_survived", "client_bytes_lost",
                                                 "client_max_stall_ms")})  # fmt: skip
        return out

    def harmed(self, result: dict[str, Any]) -> bool:
        keys = ["ssh_after_migration", "guest_process_survived", "disk_digest_match"]
        if self.netns is not None:
            keys.append("client_session_survived")
            if result.get("client_bytes_lost") != 0:
                return True
        return not all(result.get(k) for k in keys)


async def _migrate_and_measure(
    cluster: LocalCluster,
    *,
    memory: int,
    dirty_rate: float,
    postcopy: bool,
    multifd: int,
    say: Callable[[str], None],
    on_event: Callable[[dict[str, Any]], None] | None,
    debian: DebianGuest | None = None,
    measure: bool = True,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "status": "failed", "mode": "postcopy" if postcopy else "precopy", "channel": "secure",
        "source": SOURCE, "destination": DEST, "user": USER, "vm": "demo-vm",
        "total_ms": None, "downtime_ms": None, "heartbeat_gap_ms": None,
        "heartbeat_seq_continuous": False, "memory_checksum_match": False,
        "bytes_transferred": None, "throughput_mbps": None,
        "source_state": "absent", "destination_state": "absent", "error": None,
        "guest": "debian" if debian else "lab",
        "runtime_measurement": None,
    }  # fmt: skip
    src: ControlClient = await cluster.client(SOURCE, USER)
    dst: ControlClient = await cluster.client(DEST, USER)
    try:
        workload_mib = max(16, min(memory - 128, memory // 2))
        workload: dict[str, Any] = {"mem_mib": workload_mib, "dirty_rate": dirty_rate}
        spec: dict[str, Any] = {"name": "demo-vm", "memory_mib": memory, "tenant": "acme",
                                "workload": workload}  # fmt: skip
        if measure and not postcopy:  # the kernel's code is measured on both ends (pre-copy)
            spec["measure"] = [kernel_text_region(build_image().kernel).model_dump()]
        say(
            f"booting demo-vm on {SOURCE} ({memory} MiB, workload {workload_mib} MiB "
            f"dirtied at {dirty_rate:g} MiB/s)"
        )
        policy = cluster.signed_policy(USER, "demo-vm")
        if debian is None:
            await src.call("vm.start", {"spec": spec, "policy": policy}, timeout=300)
        else:
            definition = debian.definition(workload, memory, measure=measure and not postcopy)
            await src.call("vm.define", {"definition": definition})
            await src.call("vm.start", {"name": "demo-vm", "policy": policy}, timeout=300)
            prepared = await asyncio.to_thread(debian.before)
            if prepared is not None:
                result["error"] = prepared
                return result
        await asyncio.sleep(1.0)
        before = await src.call("vm.check", {"name": "demo-vm"}, timeout=120)
        t_mig = time.time()
        say(f"migrating demo-vm {SOURCE} -> {DEST} over the secure channel")
        opts: dict[str, Any] = {"mode": "postcopy" if postcopy else "precopy", "multifd": multifd}
        try:
            res = await src.call(
                "migrate",
                {"vm": "demo-vm", "to": DEST, "options": opts},
                on_event=on_event,
                timeout=900,
            )
        except ControlError as e:
            result["error"] = str(e)
            res = None
        if res is not None:
            for k in (
                "mode",
                "total_ms",
                "downtime_ms",
                "bytes_transferred",
                "throughput_mbps",
                "migration_id",
                "attestation",
                "attestation_pcr_digest",
                "handshake_ms",
                "time_to_first_byte_ms",
                "streams",
                "channel",
                "cpu_s_source",
                "decisions",
                "receipt_id",
                "destination_claim",
                "stream_recoveries",
                "runtime_measurement",
            ):
                result[k] = res.get(k)
            result["status"] = "completed"
            if postcopy:
                result["runtime_measurement"] = {
                    "skipped": "post-copy runs the guest before all of its memory arrived"
                }
            await asyncio.sleep(1.0)  # let the destination guest run and print heartbeats
            hbs = await dst.call("vm.heartbeats", {"name": "demo-vm", "since": t_mig - 5})
            cont = analyse(
                [tuple(h) for h in res.get("source_heartbeats", [])],
                [tuple(h) for h in hbs["heartbeats"]],
            )
            result["heartbeat_gap_ms"] = cont.gap_ms
            result["heartbeat_seq_continuous"] = cont.continuous
            result["heartbeat_detail"] = cont.to_json()
            after = await dst.call("vm.check", {"name": "demo-vm"}, timeout=120)
            result["memory_check"] = {"before": before, "after": after}
            intact = after["bad_pages"] == 0 and after["marker_ok"] == after["marker_total"]
            if dirty_rate == 0:
                intact = intact and after["digest"] == before["digest"]
            result["memory_checksum_match"] = intact
            if debian is not None:
                result.update(await asyncio.to_thread(debian.after))
        for key, client in (("source_state", src), ("destination_state", dst)):
            try:
                vms = (await client.call("vm.list"))["vms"]
                mine = [v for v in vms if v["name"] == "demo-vm"]
                result[key] = mine[0]["qemu_state"] if mine else "absent"
            except ControlError:
                result[key] = "absent"
        guest_ok = debian is None or not debian.harmed(result)
        if result["status"] == "completed" and not (
            result["heartbeat_seq_continuous"]
            and result["memory_checksum_match"]
            and result["destination_state"] == "running"
            and result["source_state"] == "absent"
            and guest_ok
        ):
            result["status"] = "failed"
            result["error"] = result["error"] or "the guest was harmed: see heartbeat/memory fields"
        return result
    finally:
        for client in (src, dst):
            with contextlib.suppress(ControlError):
                await client.call("vm.stop", {"name": "demo-vm"}, timeout=30)
            with contextlib.suppress(ControlError):
                await client.call("vm.undefine", {"name": "demo-vm"}, timeout=30)
            await client.close()


def run_demo(
    *,
    state_dir: Path | None,
    memory: int = 512,
    dirty_rate: float = 16.0,
    postcopy: bool = False,
    multifd: int = 0,
    dest_data_listen: str | None = None,
    dest_data_advertise: str | None = None,
    say: Callable[[str], None] = lambda s: None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    guest: str = "lab",
    measure: bool = True,
    netns: bool = False,
) -> dict[str, Any]:
    """Raises DemoError for a combination of options that cannot run."""
    if netns and guest != "debian":
        raise DemoError("--netns measures the guest's network clients: use it with --guest debian")
    tmp = None
    if state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="trustmig-demo-")
        state_dir = Path(tmp.name)
    t0 = time.monotonic()
    say("building the guest image (cached after the first run)")
    build_image(progress=say)
    image = build_debian_image(progress=say) if guest == "debian" else None
    cluster = LocalCluster(state_dir, (SOURCE, DEST), netns=netns)
    try:
        dl = {DEST: dest_data_listen} if dest_data_listen else None
        da = {DEST: dest_data_advertise} if dest_data_advertise else None
        cluster.setup(
            labels={
                SOURCE: {"country": "DE", "zone": "eu-1", "security_level": 3},
                DEST: {"country": "FR", "zone": "eu-2", "security_level": 3},
            },
            accept_tenants={SOURCE: ["acme"], DEST: ["acme"]},
            data_listen=dl,
            data_advertise=da,
        )
        cluster.add_user(USER, ["owner", "operator"], tenant="acme")
        say("starting two agents " + ("in network namespaces" if netns else "on loopback"))
        cluster.start_agents()
        res = asyncio.run(
            _migrate_and_measure(
                cluster,
                memory=memory,
                dirty_rate=dirty_rate,
                postcopy=postcopy,
                multifd=multifd,
                say=say,
                on_event=on_event,
                debian=DebianGuest(cluster, image) if image is not None else None,
                measure=measure,
            )
        )
        res["state_dir"] = str(state_dir) if tmp is None else None
        res["elapsed_s"] = round(time.monotonic() - t0, 1)
        return res
    finally:
        cluster.stop()
        if tmp is not None:
            tmp.cleanup()
