"""The two targets every attack runs against, and how the lab reads a guest's state.

*Baseline*: live migration as many operators run it — QEMU's own direct TCP migration between
two QEMU processes, no TLS, no attestation, no policy, the management socket reachable by
whoever gets to it. *trustmig*: a local cluster of real agent processes (each with its own
swtpm, CA-issued identity, policies and audit log) on loopback:

* ``host-a`` is the source of every migration;
* ``host-b`` is an honest destination;
* ``host-r`` runs a hypervisor binary that was changed after the administrator approved it;
* ``host-l`` runs genuine, attested software but lies in its resource claims
  (``trustmig.lab.liar_agent``).

Each destination's data port sits behind its own man-in-the-middle proxy whose tap the attacks
swap, so every byte of every migration can be observed, recorded, rewritten or cut. Guests are
small (256 MiB, 64 MiB of self-checking pages, dirtied at 4 MiB/s) so that the whole lab runs
in a few minutes; all QEMUs and agents are stopped by their own PIDs at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustmig.agent.client import ControlClient, ControlError
from trustmig.agent.local_cluster import LocalCluster, free_port
from trustmig.hypervisor.accel import AccelChoice, choose_accel
from trustmig.hypervisor.debian import DebianImage, build_debian_image
from trustmig.hypervisor.devices import HostNet
from trustmig.hypervisor.image import GuestImage, build_image
from trustmig.hypervisor.migration import MigrationProgress, query
from trustmig.hypervisor.qemu import QemuVM
from trustmig.hypervisor.spec import VMSpec
from trustmig.lab.proxy import MitmProxy, Tap

MEMORY_MIB = 256
FILL_MIB = 64
DIRTY_MIB_S = 4.0
BOOT_TIMEOUT_S = 180.0
MIGRATION_TIMEOUT_S = 120.0
CHECK_TIMEOUT_S = 15.0
SOURCE = "host-a"
HONEST, ROGUE, LIAR = "host-b", "host-r", "host-l"
DESTINATIONS = (HONEST, ROGUE, LIAR)
OWNER, MALLORY, SECADMIN = "alice", "mallory", "sam"
#: An operator of another tenant, another owner of the victim's tenant, an operator to revoke.
EVE, HIJACKER, RITA = "eve", "oscar", "rita"
#: The administrator who drains hosts (``host.evacuate``).
CLUSTER_ADMIN = "cleo"
TENANT = "acme"

Say = Callable[[str], None]


def guest_spec(name: str, image: GuestImage | None = None) -> VMSpec:
    return VMSpec.model_validate(
        {
            "name": name,
            "memory_mib": MEMORY_MIB,
            "tenant": TENANT,
            "image_key": image.key if image else None,
            "workload": {"mem_mib": FILL_MIB, "dirty_rate": DIRTY_MIB_S},
        }
    )


class Baseline:
    """Bare QEMU processes migrating over plain TCP; every QEMU started is killed at the end."""

    def __init__(self, workdir: Path, image: GuestImage, accel: AccelChoice) -> None:
        self.workdir = workdir
        self.image = image
        self.accel = accel
        self._vms: list[QemuVM] = []
        self._n = 0

    def _dir(self, label: str) -> Path:
        self._n += 1
        d = self.workdir / f"{self._n:03d}-{label}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    async def boot(self, name: str) -> QemuVM:
        """A running guest whose workload has filled its memory."""
        return await self.boot_spec(guest_spec(name, self.image))

    async def boot_spec(self, spec: VMSpec, host_net: HostNet | None = None) -> QemuVM:
        """A running guest of any definition, ready once its workload says so (in the network
        namespace of ``host_net``, if it names one)."""
        ns = host_net.netns if host_net is not None else None
        vm = QemuVM(spec, self.image, self._dir(f"{spec.name}-src"), self.accel,
                    host_net=host_net, die_with_parent=True,
                    launcher=("ip", "netns", "exec", ns) if ns else ())  # fmt: skip
        self._vms.append(vm)
        await vm.start()
        if spec.waits_for_workload:
            await vm.console.wait_for("READY", BOOT_TIMEOUT_S)
        return vm

    async def destination(
        self, name: str, *, binary: str = "qemu-system-x86_64"
    ) -> tuple[QemuVM, int]:
        """An incoming QEMU listening on a loopback TCP port; it runs the guest once loaded."""
        return await self.destination_spec(guest_spec(name, self.image), binary=binary)

    async def destination_spec(
        self, spec: VMSpec, host_net: HostNet | None = None, *, binary: str = "qemu-system-x86_64"
    ) -> tuple[QemuVM, int]:
        vm = QemuVM(
            spec,
            self.image,
            self._dir(f"{spec.name}-dst"),
            self.accel,
            binary=binary,
            incoming=True,
            die_with_parent=True,
            host_net=host_net,
        )
        self._vms.append(vm)
        await vm.start()
        await vm.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        info = await vm.cmd("query-migrate")
        return vm, int(info["socket-address"][0]["port"])

    async def migrate(
        self,
        src: QemuVM,
        port: int,
        *,
        postcopy_after_rounds: int | None = None,
        dst: QemuVM | None = None,
        max_bandwidth_mibps: int | None = None,
        timeout: float = MIGRATION_TIMEOUT_S,
        on_postcopy: Callable[[], None] | None = None,
    ) -> MigrationProgress:
        """Plain ``migrate tcp:`` as an operator would type it; waits for the source's end.

        ``on_postcopy`` is called once the source reports post-copy active."""
        if postcopy_after_rounds is not None:
            for vm in (src, dst):
                if vm is not None:
                    await vm.cmd(
                        "migrate-set-capabilities",
                        {"capabilities": [{"capability": "postcopy-ram", "state": True}]},
                    )
        if max_bandwidth_mibps:
            # the limit holds after a post-copy switch too (QEMU's default there is unlimited)
            limit = max_bandwidth_mibps * 1024 * 1024
            await src.cmd(
                "migrate-set-parameters",
                {"max-bandwidth": limit, "max-postcopy-bandwidth": limit},
            )
        await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        t0 = time.monotonic()
        switched = False
        while True:
            prog = await query(src)
            if prog.status in ("completed", "failed", "cancelled", "postcopy-paused"):
                return prog
            if on_postcopy is not None and prog.status == "postcopy-active":
                on_postcopy()
                on_postcopy = None
            if (
                postcopy_after_rounds is not None
                and not switched
                and prog.status == "active"
                and prog.rounds >= postcopy_after_rounds
            ):
                await src.cmd("migrate-start-postcopy")
                switched = True
            if time.monotonic() - t0 > timeout:
                return prog
            await asyncio.sleep(0.02)

    async def migrate_tapped(
        self, name: str, tap: Tap, *, binary: str = "qemu-system-x86_64"
    ) -> tuple[QemuVM, QemuVM, MigrationProgress]:
        """Boot ``name``, migrate it to a fresh destination through a proxy running ``tap``;
        returns (source, destination, the source's final progress)."""
        src = await self.boot(name)
        dst, port = await self.destination(name, binary=binary)
        with MitmProxy(("127.0.0.1", port), tap) as proxy:
            prog = await self.migrate(src, proxy.address[1])
            await self.settle(dst)
        return src, dst, prog

    async def settle(self, dst: QemuVM, timeout: float = 30.0) -> str:
        """Wait until the destination finished loading (or failed/died); its run state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not dst.alive():
                return "exited"
            with contextlib.suppress(Exception):
                prog = await query(dst)
                if prog.status in ("completed", "failed"):
                    break
            await asyncio.sleep(0.05)
        if not dst.alive():
            return "exited"
        with contextlib.suppress(Exception):
            return await dst.status()
        return "unknown"

    async def migrate_to(self, name: str, host: str) -> tuple[MigrationProgress, dict[str, Any]]:
        """Boot ``name`` and migrate it, untapped, to an incoming QEMU standing for ``host``
        (the one a placement chose); the migration's progress and the guest's state."""
        src = await self.boot(name)
        dst, port = await self.destination(name)
        prog = await self.migrate(src, port)
        await self.settle(dst)
        return prog, await self.state({"source": src, host: dst})

    async def state(self, vms: dict[str, QemuVM]) -> dict[str, Any]:
        """Which copies run, and what the running guest says about its own memory."""
        running: list[str] = []
        checks: dict[str, Any] = {}
        beating: dict[str, bool] = {}
        for where, vm in vms.items():
            st = "exited"
            if vm.alive():
                with contextlib.suppress(Exception):
                    st = await vm.status()
            if st != "running":
                continue
            running.append(where)
            n0 = len(vm.console.heartbeats_since(0))
            try:
                c = await vm.console.check(CHECK_TIMEOUT_S)
                checks[where] = {
                    "bad_pages": c.bad_pages,
                    "marker_ok": c.marker_ok,
                    "marker_total": c.marker_total,
                }
            except Exception as e:  # noqa: BLE001 - a guest that cannot answer is evidence
                checks[where] = {"error": f"no memory check answer ({type(e).__name__})"}
            await asyncio.sleep(0.3)
            beating[where] = len(vm.console.heartbeats_since(0)) > n0
        return _state(running, checks, beating)

    async def close(self) -> None:
        for vm in self._vms:
            with contextlib.suppress(Exception):
                await vm.kill()
        self._vms.clear()


def _state(running: list[str], checks: dict[str, Any], beating: dict[str, bool]) -> dict[str, Any]:
    intact = [
        "error" not in c and c["bad_pages"] == 0 and c["marker_ok"] == c["marker_total"]
        for c in checks.values()
    ]
    return {
        "running_copies": len(running),
        "where": ",".join(running) or "nowhere",
        "memory_intact": bool(intact) and all(intact) if running else None,
        "heartbeat_continued": all(beating.values()) if beating else False,
        "checks": checks,
    }


class TrustmigCluster:
    """A four-host trustmig cluster with a switchable MITM proxy before each destination."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proxies: dict[str, MitmProxy] = {}
        self.cluster = LocalCluster(workdir / "cluster", (SOURCE, *DESTINATIONS))
        self.rogue_qemu = workdir / "rogue" / "qemu-system-x86_64"

    def start(self) -> None:
        real = shutil.which("qemu-system-x86_64")
        if real is None:
            raise RuntimeError("qemu-system-x86_64 is not installed: run scripts/bootstrap")
        self.rogue_qemu.parent.mkdir(parents=True, exist_ok=True)
        self.rogue_qemu.write_text(f'#!/bin/sh\n# hypervisor build 1\nexec {real} "$@"\n')
        self.rogue_qemu.chmod(0o755)
        listen, advertise = {}, {}
        for h in DESTINATIONS:
            port = free_port()
            proxy = MitmProxy(("127.0.0.1", port))
            proxy.__enter__()
            self.proxies[h] = proxy
            listen[h], advertise[h] = f"127.0.0.1:{port}", proxy.hostport
        self.cluster.setup(
            data_listen=listen,
            data_advertise=advertise,
            qemu_binary={ROGUE: str(self.rogue_qemu)},
            agent_module={LIAR: "trustmig.lab.liar_agent"},
            extra_config={SOURCE: "admission = {max_per_vm_per_hour = 1000}"},
            # both tenants are welcome everywhere: what keeps them apart is co-residency
            accept_tenants={h: [TENANT, "evil"] for h in (SOURCE, *DESTINATIONS)},
        )
        # the rogue host's hypervisor changes after its measurement was approved
        with self.rogue_qemu.open("a") as f:
            f.write("# patched after approval\n")
        self.cluster.add_user(OWNER, ["owner", "operator"], tenant=TENANT)
        self.cluster.add_user(MALLORY, ["auditor"], tenant=TENANT)
        self.cluster.add_user(SECADMIN, ["security-admin"])
        self.cluster.add_user(EVE, ["owner", "operator"], tenant="evil")
        self.cluster.add_user(HIJACKER, ["owner"], tenant=TENANT)
        self.cluster.add_user(RITA, ["operator"], tenant=TENANT)
        self.cluster.add_user(CLUSTER_ADMIN, ["cluster-admin"])
        self.cluster.start_agents()

    def tap(self, host: str, tap: Tap | None) -> None:
        self.proxies[host].set_tap(tap)

    async def client(self, host: str, user: str = OWNER) -> ControlClient:
        return await self.cluster.client(host, user)

    async def boot(
        self, name: str, *, host: str = SOURCE, user: str = OWNER, tenant: str = TENANT,
        **policy: Any,
    ) -> None:  # fmt: skip
        """Boot ``name`` on ``host`` with its owner's signed policy (``policy`` overrides)."""
        c = await self.client(host, user)
        spec = guest_spec(name).model_dump(mode="json", exclude={"image_key", "owner"})
        try:
            await c.call(
                "vm.start",
                {
                    "spec": {**spec, "tenant": tenant},
                    "policy": self.cluster.signed_policy(
                        user, name, tenant=tenant, **({"allowed_users": [user]} | policy)
                    ),
                },
                timeout=BOOT_TIMEOUT_S + 60,
            )
        finally:
            await c.close()

    async def migrate(
        self, name: str, to: str, options: dict[str, Any] | None = None, user: str = OWNER
    ) -> tuple[dict[str, Any] | None, str | None]:
        c = await self.client(SOURCE, user)
        try:
            res = await c.call(
                "migrate",
                {"vm": name, "to": to, "options": options or {}},
                timeout=MIGRATION_TIMEOUT_S + 60,
            )
            return res, None
        except ControlError as e:
            return None, str(e)
        finally:
            await c.close()

    async def migrate_tapped(
        self, name: str, to: str, tap: Tap, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any] | None, str | None]:
        """Boot ``name`` on the source and migrate it to ``to`` with ``tap`` on the data path."""
        await self.boot(name)
        self.tap(to, tap)
        try:
            return await self.migrate(name, to, options)
        finally:
            self.tap(to, None)

    async def state(self, name: str, user: str = OWNER) -> dict[str, Any]:
        """Copies of ``name`` running on any host, with the guest's own memory check (as
        ``user``, who must be allowed to see the VM)."""
        running: list[str] = []
        checks: dict[str, Any] = {}
        beating: dict[str, bool] = {}
        incoming_alive = 0
        for host in (SOURCE, *DESTINATIONS):
            c = await self.client(host, user)
            try:
                st = await c.call("host.status")
                incoming_alive += sum(
                    1
                    for i in st.get("incoming", [])
                    if i.get("pid") and i.get("state") != "running"
                )
                vms = {v["name"]: v for v in (await c.call("vm.list"))["vms"]}
                if vms.get(name, {}).get("qemu_state") != "running":
                    continue
                running.append(host)
                n0 = len((await c.call("vm.heartbeats", {"name": name}))["heartbeats"])
                try:
                    chk = await c.call(
                        "vm.check",
                        {"name": name, "timeout": CHECK_TIMEOUT_S},
                        timeout=CHECK_TIMEOUT_S + 5,
                    )
                    checks[host] = {k: chk[k] for k in ("bad_pages", "marker_ok", "marker_total")}
                except ControlError as e:
                    checks[host] = {"error": f"no memory check answer ({e})"}
                await asyncio.sleep(0.3)
                n1 = len((await c.call("vm.heartbeats", {"name": name}))["heartbeats"])
                beating[host] = n1 > n0
            finally:
                await c.close()
        out = _state(running, checks, beating)
        out["pending_incoming"] = incoming_alive
        return out

    async def stop_vm(self, name: str, user: str = OWNER) -> None:
        for host in (SOURCE, *DESTINATIONS):
            c = await self.client(host, user)
            try:
                with contextlib.suppress(ControlError):
                    await c.call("vm.stop", {"name": name}, timeout=30)
            finally:
                await c.close()

    async def clear_quarantine(self, host: str) -> str | None:
        """A security administrator lifts ``host``'s quarantine on the source (lab reset)."""
        c = await self.client(SOURCE, SECADMIN)
        try:
            return str((await c.call("guard.clear", {"host": host}))["by"])
        except ControlError:
            return None
        finally:
            await c.close()

    async def stop_all(self) -> None:
        """Stop every VM on every host, every tenant's (between attacks)."""
        for host in (SOURCE, *DESTINATIONS):
            c = await self.client(host, SECADMIN)
            try:
                for v in (await c.call("vm.list"))["vms"]:
                    with contextlib.suppress(ControlError):
                        await c.call("vm.stop", {"name": v["name"]}, timeout=30)
            finally:
                await c.close()

    async def host_status(self, host: str) -> dict[str, Any]:
        c = await self.client(host)
        try:
            return await c.call("host.status")
        finally:
            await c.close()

    def close(self) -> None:
        self.cluster.stop()
        for p in self.proxies.values():
            p.close()


class LabEnv:
    """Everything the attacks share: image, accelerator, the baseline and the cluster."""

    def __init__(self, workdir: Path, say: Say = lambda s: None) -> None:
        self.workdir = workdir
        self.say = say
        self.image = build_image(progress=say)
        self.accel = choose_accel("auto")
        self.baseline = Baseline(workdir / "baseline", self.image, self.accel)
        self.trustmig = TrustmigCluster(workdir / "trustmig")
        self._started = False
        self._debian: DebianImage | None = None

    def debian_image(self) -> DebianImage:
        """The Debian guest (built on first use, cached like the lab image)."""
        if self._debian is None:
            self._debian = build_debian_image(progress=self.say)
        return self._debian

    def start(self) -> None:
        if not self._started:
            self.say("starting a four-host trustmig cluster (agents, swtpm, CA)")
            self.trustmig.start()
            self._started = True

    async def reset_baseline(self) -> None:
        await self.baseline.close()

    def close(self) -> None:
        if self._started:
            self.trustmig.close()
