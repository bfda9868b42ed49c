"""What a host must provide behind a VM definition: images, boot files, bridges, taps, ports.

A destination calls :func:`host_problems` before it accepts a migration and a host before it
starts a VM, so that a definition it cannot satisfy is refused in one line before any QEMU
exists. Shared disks carry an identity tag (an extended attribute on the image file, set the
first time a VM starts from it): two hosts that read the same tag from their paths look at the
same image, which neither the path nor the size can prove.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import secrets
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from trustmig.hypervisor.image import sha256_file
from trustmig.hypervisor.spec import BridgeNet, DiskSpec, KernelBoot, TenantNet, VMSpec

IDENTITY_XATTR = "user.trustmig.id"
_QEMU_IMG_TIMEOUT_S = 30.0


class HostCannotRun(Exception):
    """This host cannot provide what a definition needs; the message is one line."""


#: VXLAN network identifiers a tenant segment may use (names must fit the kernel's 15 chars)
MAX_TENANT_VNI = 999_999


@dataclass(frozen=True)
class HostNet:
    """The host side of a guest: where forwarded ports bind, the QEMU it runs, and the
    tenants' network segments (``tenant_vnis``; with ``tenants_only`` no NIC may join a
    shared bridge)."""

    forward_address: str = "127.0.0.1"
    qemu_binary: str = "qemu-system-x86_64"
    tenant_vnis: tuple[tuple[str, int], ...] = ()
    tenants_only: bool = False
    #: the network namespace QEMU runs in (``launcher`` enters it): its taps are made there
    netns: str | None = None

    def vni_of(self, tenant: str) -> int | None:
        return dict(self.tenant_vnis).get(tenant)


def tenant_bridge(vni: int) -> str:
    """The bridge of one tenant's segment on every host."""
    return f"tvb{vni}"


def tenant_port_prefix(vni: int) -> str:
    """Every port of a tenant's bridge (its guests' taps, its VXLAN) starts with this: the
    kernel rules let frames pass only between ports of one prefix."""
    return f"tv{vni}_"


def tenant_tap(vni: int, run_key: str, nic_id: str) -> str:
    prefix = tenant_port_prefix(vni)
    digest = hashlib.sha256(f"{run_key}/{nic_id}".encode()).hexdigest()
    return prefix + digest[: 15 - len(prefix)]


def disk_identity(path: Path, *, create: bool) -> str | None:
    """The image's identity tag; with ``create`` a new random one is set if it has none.

    Raises HostCannotRun if the file system keeps no extended attributes."""
    try:
        return os.getxattr(path, IDENTITY_XATTR).decode()
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            raise HostCannotRun(
                f"{path}: its file system keeps no extended attributes, which prove that "
                "both hosts see the same shared image; put it on one that does (ext4, xfs, "
                "NFS 4.2, CephFS)"
            ) from None
        if e.errno != errno.ENODATA:
            raise HostCannotRun(f"{path}: cannot read its identity ({e.strerror})") from None
    if not create:
        return None
    tag = secrets.token_hex(16)
    os.setxattr(path, IDENTITY_XATTR, tag.encode(), os.XATTR_CREATE)
    return tag


def image_info(path: Path, fmt: str) -> dict[str, object]:
    """``qemu-img info`` of an image another QEMU may hold open (read with force-share)."""
    try:
        out = subprocess.run(
            ["qemu-img", "info", "--force-share", "--output=json", "-f", fmt, str(path)],
            capture_output=True, text=True, timeout=_QEMU_IMG_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostCannotRun(f"{path}: qemu-img info failed ({e})") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise HostCannotRun(f"{path}: not a readable {fmt} image ({last})")
    info: dict[str, object] = json.loads(out.stdout)
    return info


def stamp_disks(spec: VMSpec) -> VMSpec:
    """The definition with every shared disk's identity tag recorded (set if new), every
    copied plain disk's virtual size and every boot file's digest, as the host that first
    starts the VM sees them."""
    disks = []
    for d in spec.disks:
        _require_file(d.path, f"disk {d.id}")
        if d.shared:
            d = d.model_copy(update={"identity": disk_identity(d.path, create=True)})
        if d.encrypt:
            pass  # its size is read with its key, where the key is (the agent's disk keys)
        elif not d.shared:  # a disk that is copied when the VM migrates: its target gets this size
            size = image_info(d.path, d.format).get("virtual-size")
            d = d.model_copy(update={"virtual_size": size if isinstance(size, int) else None})
        disks.append(d)
    boot = spec.boot
    if isinstance(boot, KernelBoot):
        _require_file(boot.kernel, "boot.kernel")
        update = {"kernel_sha256": boot.kernel_sha256 or sha256_file(boot.kernel)}
        if boot.initrd is not None:
            _require_file(boot.initrd, "boot.initrd")
            update["initrd_sha256"] = boot.initrd_sha256 or sha256_file(boot.initrd)
        boot = boot.model_copy(update=update)
    return spec.model_copy(update={"disks": disks, "boot": boot})


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise HostCannotRun(f"{what}: {path} does not exist on this host")


def host_problems(spec: VMSpec, net: HostNet, *, incoming: bool) -> list[str]:
    """Everything this host lacks to run ``spec`` (empty when it can), one line each."""
    problems: list[str] = []
    try:
        machine_types(net.qemu_binary).canonical(spec.machine)
    except HostCannotRun as e:
        problems.append(str(e))
    for check in (_boot_problems(spec), _bridge_problems(spec), _port_problems(spec, net),
                  _tenant_problems(spec, net)):  # fmt: skip
        problems.extend(check)
    for d in spec.disks:
        if incoming and not d.shared:
            continue  # created here
        problems.extend(_disk_problems(d, incoming=incoming))
    return problems


def require_host_can_run(spec: VMSpec, net: HostNet, *, incoming: bool, host: str) -> None:
    """Raises HostCannotRun with the first problem (and how many more) in one line."""
    problems = host_problems(spec, net, incoming=incoming)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise HostCannotRun(f"{host} cannot run VM {spec.name}: {problems[0]}{more}")


def _boot_problems(spec: VMSpec) -> list[str]:
    boot = spec.boot
    if not isinstance(boot, KernelBoot):
        return []
    out: list[str] = []
    for what, path, digest in (
        ("boot.kernel", boot.kernel, boot.kernel_sha256),
        ("boot.initrd", boot.initrd, boot.initrd_sha256),
    ):
        if path is None:
            continue
        if not path.is_file():
            out.append(f"{what} {path} does not exist")
        elif digest and sha256_file(path) != digest:
            out.append(f"{what} {path} differs from the source's (sha256 {digest[:12]})")
    return out


def _bridge_problems(spec: VMSpec) -> list[str]:
    return [
        f"bridge {br} does not exist (create it, or change the NIC's backend)"
        for br in spec.bridges()
        if not Path(f"/sys/class/net/{br}/bridge").is_dir()
    ]


def _tenant_problems(spec: VMSpec, net: HostNet) -> list[str]:
    problems = []
    if any(isinstance(n.backend, TenantNet) for n in spec.nics) and net.vni_of(spec.tenant) is None:
        problems.append(f"tenant {spec.tenant} has no network segment on this host: add it to "
                        "[tenant_networks] vnis in the host config")  # fmt: skip
    if net.tenants_only:
        problems.extend(
            f"NIC {n.id} joins the shared bridge {n.backend.bridge}, but this host keeps "
            'tenants apart: use backend = { kind = "tenant" }'
            for n in spec.nics
            if isinstance(n.backend, BridgeNet)
        )
    return problems


def _port_problems(spec: VMSpec, net: HostNet) -> list[str]:
    out = []
    for f in spec.forwards():
        kind = socket.SOCK_STREAM if f.proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((net.forward_address, f.host_port))
            except OSError as e:
                out.append(
                    f"forwarded port {f.proto} {net.forward_address}:{f.host_port} is not "
                    f"free ({e.strerror})"
                )
    return out


def _disk_problems(d: DiskSpec, *, incoming: bool) -> list[str]:
    if not d.path.is_file():
        return [f"disk {d.id}: {d.path} does not exist"]
    if not incoming or not d.shared:
        return []  # a copied disk's target is created here, in the host's own directory
    try:
        tag = disk_identity(d.path, create=False)
    except HostCannotRun as e:
        return [str(e)]
    if tag is None or tag != d.identity:
        return [
            f"disk {d.id}: {d.path} here is not the source's image (identity "
            f"{(tag or 'none')[:8]} vs {(d.identity or 'none')[:8]})"
        ]
    return []


def tap_name(run_key: str, nic_id: str) -> str:
    """A tap name unique to one QEMU process and NIC, within the kernel's 15 characters."""
    return "tm" + hashlib.sha256(f"{run_key}/{nic_id}".encode()).hexdigest()[:11]


def _ip(*args: str, netns: str | None = None) -> None:
    where = ["-n", netns] if netns else []
    out = subprocess.run(["ip", *where, *args], capture_output=True, text=True, timeout=10,
                         check=False)  # fmt: skip
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise HostCannotRun(f"ip {' '.join(args)}: {last}")


def create_tap(name: str, bridge: str, netns: str | None = None) -> None:
    """A tap device enslaved to ``bridge`` and up (root only), in ``netns`` if given; raises
    HostCannotRun."""
    delete_tap(name, netns)
    _ip("tuntap", "add", "dev", name, "mode", "tap", netns=netns)
    try:
        knob = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
        if netns is None and knob.exists():
            knob.write_text("1")
        _ip("link", "set", "dev", name, "master", bridge, netns=netns)
        _ip("link", "set", "dev", name, "up", netns=netns)
    except HostCannotRun:
        delete_tap(name, netns)
        raise


def delete_tap(name: str, netns: str | None = None) -> None:
    """Remove a tap if it exists (idempotent)."""
    if netns is None and not Path(f"/sys/class/net/{name}").exists():
        return
    where = ["-n", netns] if netns else []
    subprocess.run(["ip", *where, "link", "del", "dev", name], capture_output=True, timeout=10,
                   check=False)  # fmt: skip


@dataclass(frozen=True)
class MachineTypes:
    """The machine types a QEMU binary offers, and which names are aliases of which."""

    names: frozenset[str]
    aliases: dict[str, str]

    def canonical(self, machine: str) -> str:
        """The versioned type behind ``machine`` (``pc`` → ``pc-i440fx-7.2``): both hosts of a
        migration must run the same one, which an alias does not promise across QEMU versions.
        Raises HostCannotRun for a type this QEMU does not offer."""
        if machine not in self.names:
            raise HostCannotRun(
                f"machine type {machine} is not offered by this host's QEMU "
                "(see qemu-system-x86_64 -machine help)"
            )
        return self.aliases.get(machine, machine)


def parse_machine_help(text: str) -> MachineTypes:
    names: set[str] = set()
    aliases: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        parts = line.split(None, 1)
        if not parts:
            continue
        names.add(parts[0])
        m = re.search(r"\(alias of ([^)]+)\)", line)
        if m:
            aliases[parts[0]] = m.group(1)
    return MachineTypes(frozenset(names), aliases)


@functools.lru_cache(maxsize=8)
def machine_types(binary: str) -> MachineTypes:
    """What ``binary -machine help`` lists (asked once per binary and process)."""
    try:
        out = subprocess.run([binary, "-machine", "help"], capture_output=True, text=True,
                             timeout=30, check=False)  # fmt: skip
    except OSError as e:
        raise HostCannotRun(f"{binary}: cannot run it ({e.strerror})") from None
    return parse_machine_help(out.stdout)
