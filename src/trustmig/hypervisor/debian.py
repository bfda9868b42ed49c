"""A real guest OS built offline: Debian 12 with systemd, sshd, a test user and the workload.

``mmdebstrap`` installs Debian's own packages (from the mirror apt already uses) into a
directory; the cloud kernel of the lab image is unpacked into it with its modules (so the guest
can load virtio-net), the workload runs as a systemd service on the serial console exactly as in
the lab guest, and ``mke2fs -d`` turns the tree into an ext4 image without loop mounts. The
guest boots its own kernel directly from the host (``boot.kind = "kernel"``) with its root file
system on a virtio disk; the cloud kernel has virtio only as modules (and QEMU 7.2 cannot migrate
the NVMe disk the kernel has built in), so a tiny busybox initramfs loads them first.

The image is cached under a key hashing the recipe, the package list, the kernel package and the
workload's source. A VM never writes to it: each VM gets a qcow2 overlay on top of it
(:func:`create_overlay`). The build also leaves an SSH key pair for the test user and the
guest's host key, so clients log in with keys and really authenticate the guest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmig.hypervisor.image import (
    BUSYBOX_PACKAGE,
    ImageBuildError,
    _compile_workload,
    _Entry,
    _extract_member,
    _fetch_deb,
    _guest_sources,
    _kernel_package,
    _locked,
    _newc_archive,
    _run,
    _write_json_atomic,
    default_cache_dir,
)

__all__ = ["DebianImage", "build_debian_image", "create_overlay", "debian_definition"]

#: Bump whenever the way the image is assembled changes.
RECIPE_VERSION = 3
SUITE = "bookworm"
OS_NAME = "debian-12"
PACKAGES = (
    "systemd-sysv", "openssh-server", "iproute2", "udev", "kmod", "passwd", "procps",
)  # fmt: skip
ROOT_SIZE = "2G"
TEST_USER = "tm"
#: the test user's password: the lab's wrong-password logins are checked against it
TEST_PASSWORD = "trustmig-lab-password"
ROOT_IMAGE = "root.img"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.gz"
#: QEMU 7.2 cannot migrate an NVMe device, and the cloud kernel has virtio only as modules: a
#: tiny initramfs loads these (and what they depend on, in modules.dep order) before root
INITRD_MODULES = ("virtio_pci", "virtio_blk")
CLIENT_KEY = "id_ed25519"
KNOWN_HOSTS = "known_hosts"
RECORD = "image.json"
_MMDEBSTRAP_TIMEOUT_S = 900.0

_SERVICE = """[Unit]
Description=trustmig test workload (heartbeats and memory checks on the serial console)
After=local-fs.target

[Service]
ExecStart=/usr/local/sbin/tm-workload-run
StandardInput=tty-force
StandardOutput=tty
TTYPath=/dev/ttyS0
TTYReset=no
TTYVHangup=no
Restart=no

[Install]
WantedBy=multi-user.target
"""

_RUNNER = """#!/bin/sh
# the tm.* settings on the kernel command line, as the lab guest's /init reads them
set --
for a in $(cat /proc/cmdline); do
  case "$a" in
    tm.mem_mib=*|tm.dirty_rate=*|tm.hb_ms=*|tm.secret_hex=*|tm.marker_pages=*)
      set -- "$@" "${a#tm.}";;
  esac
done
exec /usr/local/bin/tm-workload "$@"
"""

_INIT = """#!/bin/busybox sh
# initramfs of the trustmig Debian guest: load the virtio drivers, mount root, hand over
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in %(modules)s; do insmod /lib/modules/$m.ko || echo "initramfs: insmod $m failed"; done
root=$(sed -n 's/.*root=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
i=0
while [ ! -b "$root" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /newroot
mount -t ext4 -o rw "$root" /newroot || { echo "initramfs: cannot mount $root"; exec sh; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"""

#: sshd checks passwords itself (no PAM), as many appliance images do: the lab's Xensploit
#: attack patches that check in the guest's memory
_SSHD = """UsePAM no
PasswordAuthentication yes
KbdInteractiveAuthentication no
"""

#: ``tm.net=MAC,ADDRESS/PREFIX`` on the kernel command line gives that NIC a static address (a
#: guest on the lab's bridged guest network, where no DHCP server runs); written for networkd
#: before it starts, ahead of the DHCP default
_NET_SETUP = """#!/bin/sh
for a in $(cat /proc/cmdline); do
  case "$a" in
    tm.net=*)
      v=${a#tm.net=}; mac=${v%%,*}; addr=${v#*,}
      mkdir -p /run/systemd/network
      f=/run/systemd/network/10-tm-$(echo "$mac" | tr -d :).network
      printf '[Match]\\nMACAddress=%s\\n\\n[Network]\\nAddress=%s\\n' "$mac" "$addr" > "$f"
      printf 'LinkLocalAddressing=no\\nIPv6AcceptRA=no\\n' >> "$f";;
  esac
done
"""

_NET_SERVICE = """[Unit]
Description=trustmig static guest-network address from the kernel command line
DefaultDependencies=no
Before=systemd-networkd.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/tm-net-setup

[Install]
WantedBy=systemd-networkd.service
"""

_NETWORK = """[Match]
Name=en* eth*

[Network]
DHCP=ipv4
"""


@dataclass(frozen=True)
class DebianImage:
    """A built Debian guest: boot ``kernel`` with ``root`` (never written) behind an overlay."""

    root: Path
    kernel: Path
    initrd: Path
    client_key: Path
    known_hosts: Path
    key: str
    kernel_version: str

    def cmdline(self) -> str:
        return (
            "root=/dev/vda rw console=ttyS0 quiet loglevel=1 systemd.show_status=0 "
            "net.ifnames=0 panic=-1"
        )


def _sha(texts: tuple[str, ...]) -> str:
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()


def _image_key(kernel_sha256: str, workload_source: bytes) -> str:
    h = hashlib.sha256()
    for part in (OS_NAME, str(RECIPE_VERSION), SUITE, ",".join(PACKAGES), ROOT_SIZE,
                 kernel_sha256, hashlib.sha256(workload_source).hexdigest(),
                 _sha((_SERVICE, _RUNNER, _NETWORK, _INIT, _SSHD)),
                 ",".join(INITRD_MODULES)):  # fmt: skip
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def _cached(final: Path) -> DebianImage | None:
    try:
        rec: dict[str, Any] = json.loads((final / RECORD).read_text())
    except (OSError, ValueError):
        return None
    paths = [final / n for n in (ROOT_IMAGE, KERNEL_FILE, INITRD_FILE, CLIENT_KEY, KNOWN_HOSTS)]
    if not all(p.is_file() for p in paths):
        return None
    root, kernel, initrd, client_key, known_hosts = paths
    return DebianImage(root, kernel, initrd, client_key, known_hosts, key=str(rec["key"]),
                       kernel_version=str(rec["kernel_version"]))  # fmt: skip


def build_debian_image(
    cache_dir: Path | None = None, *, progress: Any = None, force: bool = False
) -> DebianImage:
    """The cached Debian 12 image, built first if needed; raises ImageBuildError in one line."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = base / OS_NAME
    debs = base / "debs"  # the kernel package the lab image uses too
    say = progress or (lambda _msg: None)
    cache.mkdir(parents=True, exist_ok=True)
    debs.mkdir(parents=True, exist_ok=True)
    sources = _guest_sources()
    with _locked(cache):
        deb = _fetch_deb(debs, _kernel_package(), say)
        busybox = _fetch_deb(debs, BUSYBOX_PACKAGE, say)
        key = _image_key(deb.sha256 + busybox.sha256, sources["workload.c"])
        final = cache / key
        hit = None if force else _cached(final)
        if hit is not None:
            return hit
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
        try:
            version = _assemble(tmp, debs / deb.file, sources["workload.c"], say)
            _write_initrd(tmp, debs / busybox.file, version)
            _write_json_atomic(tmp / RECORD, {"key": key, "os": OS_NAME, "recipe": RECIPE_VERSION,
                                              "kernel_version": version,
                                              "kernel_deb": deb.as_json()})  # fmt: skip
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            _remove_tree(tmp)
            raise
        _prune_other_images(cache, key)
    image = _cached(final)
    assert image is not None
    say(f"Debian image {key[:16]} ready in {final}")
    return image


def _prune_other_images(cache: Path, key: str) -> None:
    """Images of older inputs (each about 300 MB on disk), and interrupted builds' leftovers.
    Overlays of running VMs keep a backing file open, so they run on; new VMs use ``key``."""
    for entry in cache.iterdir():
        stale = entry.name.startswith(".tmp-") or (entry / RECORD).exists()
        if entry.is_dir() and entry.name != key and stale:
            _remove_tree(entry)


def _mounts_below(path: Path) -> list[str]:
    """Mount points inside ``path`` (an interrupted mmdebstrap leaves /proc, /sys, /dev/*)."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].encode().decode("unicode_escape") for line in f]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """Delete a build directory, never crossing into a file system still mounted in it."""
    for point in _mounts_below(path):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)
    if _mounts_below(path):
        raise ImageBuildError(f"{path} still has file systems mounted in it: unmount them")
    shutil.rmtree(path, ignore_errors=True)


def _assemble(out: Path, kernel_deb: Path, workload_source: bytes, say: Any) -> str:
    """Build the tree, configure it and pack it; returns the kernel version."""
    out.chmod(0o755)
    tree = out / "tree"
    say(f"installing Debian {SUITE} with mmdebstrap (about a minute)")
    _run(
        ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
         f"--include={','.join(PACKAGES)}", SUITE, str(tree)],
        what="mmdebstrap", fix="install mmdebstrap and check access to the Debian mirror",
    )  # fmt: skip
    say("adding the kernel, its modules and the workload")
    _unpack_kernel(kernel_deb, tree, out / "kernel-deb")
    version = _kernel_version(tree)
    _run(["chroot", str(tree), "/usr/sbin/depmod", version], what="depmod", fix="include kmod")
    mods = out / "initrd-modules"
    mods.mkdir()
    moddir = tree / "usr/lib/modules" / version
    order = module_load_order((moddir / "modules.dep").read_text(), INITRD_MODULES)
    for i, rel in enumerate(order):
        shutil.copy(moddir / rel, mods / f"{i:02d}-{Path(rel).name}")
    shutil.copy(tree / "boot" / f"vmlinuz-{version}", out / KERNEL_FILE)
    (out / KERNEL_FILE).chmod(0o644)
    _install_workload(tree, _compile_workload(workload_source, out))
    _configure(tree, out)
    say(f"packing the root file system ({ROOT_SIZE} ext4)")
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        shutil.rmtree(tree / junk, ignore_errors=True)
    _run(["mke2fs", "-q", "-t", "ext4", "-L", "tmroot", "-d", str(tree), str(out / ROOT_IMAGE),
          ROOT_SIZE], what="mke2fs -d", fix="install e2fsprogs")  # fmt: skip
    (out / ROOT_IMAGE).chmod(0o444)
    _remove_tree(tree)
    return version


def _unpack_kernel(kernel_deb: Path, tree: Path, scratch: Path) -> None:
    """The kernel and its modules into the tree. Unpacked aside first: the package's ``./lib``
    would replace the merged-/usr ``/lib`` symlink of the tree with a directory."""
    _run(["dpkg-deb", "-x", str(kernel_deb), str(scratch)], what="unpacking the kernel",
         fix="delete the cached .deb and build again")  # fmt: skip
    shutil.copytree(scratch / "lib" / "modules", tree / "usr" / "lib" / "modules",
                    symlinks=True, dirs_exist_ok=True)  # fmt: skip
    shutil.copytree(scratch / "boot", tree / "boot", symlinks=True, dirs_exist_ok=True)
    shutil.rmtree(scratch)


def module_load_order(modules_dep: str, wanted: tuple[str, ...]) -> list[str]:
    """The module files to load for ``wanted`` (names), dependencies first, from modules.dep.

    Raises ImageBuildError if a wanted module is not in the kernel's modules."""
    deps: dict[str, list[str]] = {}
    for line in modules_dep.splitlines():
        mod, _, rest = line.partition(":")
        if mod:
            deps[mod] = rest.split()
    by_name = {Path(m).name.removesuffix(".ko").replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        for dep in deps.get(mod, []):
            visit(dep)
        if mod not in order:
            order.append(mod)

    for name in wanted:
        if name not in by_name:
            raise ImageBuildError(f"the guest kernel has no module {name}")
        visit(by_name[name])
    return order


def _write_initrd(out: Path, busybox_deb: Path, version: str) -> None:
    """busybox, the virtio modules (from the tree's copy, kept aside) and /init."""
    busybox = out / "busybox"
    _extract_member(busybox_deb, re.compile(r"^\./bin/busybox$"), busybox)
    mods = out / "initrd-modules"
    names = sorted(p.name.removesuffix(".ko") for p in mods.glob("*.ko"))
    entries = [
        _Entry.directory("."),
        *(_Entry.directory(d) for d in ("bin", "dev", "proc", "sys", "newroot", "lib",
                                        "lib/modules")),
        _Entry.device("dev/console", major=5, minor=1, perm=0o600),
        _Entry.file("init", (_INIT % {"modules": " ".join(names)}).encode()),
        _Entry.file("bin/busybox", busybox.read_bytes()),
        *(_Entry.file(f"lib/modules/{n}.ko", (mods / f"{n}.ko").read_bytes()) for n in names),
    ]  # fmt: skip
    import gzip

    (out / INITRD_FILE).write_bytes(gzip.compress(_newc_archive(entries), mtime=0))
    (out / INITRD_FILE).chmod(0o644)
    busybox.unlink()
    shutil.rmtree(mods)


def _kernel_version(tree: Path) -> str:
    found = sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise ImageBuildError(f"expected one kernel in the guest's /boot, found {found}")
    return found[0]


def _install_workload(tree: Path, binary: bytes) -> None:
    exe = tree / "usr/local/bin/tm-workload"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_bytes(binary)
    exe.chmod(0o755)
    runner = tree / "usr/local/sbin/tm-workload-run"
    runner.parent.mkdir(parents=True, exist_ok=True)
    runner.write_text(_RUNNER)
    runner.chmod(0o755)
    (tree / "etc/systemd/system/tm-workload.service").write_text(_SERVICE)
    net = tree / "usr/local/sbin/tm-net-setup"
    net.write_text(_NET_SETUP)
    net.chmod(0o755)
    (tree / "etc/systemd/system/tm-net.service").write_text(_NET_SERVICE)


def _configure(tree: Path, out: Path) -> None:
    """Hostname, network, the serial console left to the workload, the test user and keys."""
    (tree / "etc/hostname").write_text("tm-guest\n")
    (tree / "etc/ssh/sshd_config.d/trustmig-lab.conf").write_text(_SSHD)
    (tree / "etc/systemd/network/80-dhcp.network").write_text(_NETWORK)
    (tree / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    # ttyS0 carries the workload's protocol: no login prompt there (logins go through ssh)
    (tree / "etc/systemd/system/serial-getty@ttyS0.service").symlink_to("/dev/null")
    chroot = ["chroot", str(tree)]
    _run([*chroot, "/usr/bin/systemctl", "enable", "systemd-networkd", "tm-workload.service",
          "tm-net.service"],
         what="systemctl enable", fix="check the guest tree")  # fmt: skip
    # in group disk: the tests read and write the guest's spare disks as the test user
    _run([*chroot, "/usr/sbin/useradd", "-m", "-s", "/bin/sh", "-G", "disk", TEST_USER],
         what="useradd", fix="include passwd")  # fmt: skip
    subprocess.run([*chroot, "/usr/sbin/chpasswd"], input=f"{TEST_USER}:{TEST_PASSWORD}\n",
                   text=True, check=True, capture_output=True, timeout=60)  # fmt: skip
    key = out / CLIENT_KEY
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "trustmig-lab", "-f", str(key)],
         what="ssh-keygen", fix="install openssh-client")  # fmt: skip
    ssh_dir = tree / "home" / TEST_USER / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    _run([*chroot, "/usr/bin/chown", "-R", f"{TEST_USER}:{TEST_USER}", f"/home/{TEST_USER}/.ssh"],
         what="chown", fix="check the guest tree")  # fmt: skip
    host_pub = (tree / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
    (out / KNOWN_HOSTS).write_text(f"tm-guest {host_pub[0]} {host_pub[1]}\n")


def create_overlay(image: DebianImage, path: Path) -> Path:
    """A qcow2 disk for one VM on top of the read-only image (the VM writes only there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.root),
          str(path)], what="qemu-img create", fix="install qemu-utils")  # fmt: skip
    return path


def debian_definition(
    name: str,
    image: DebianImage,
    disk: Path,
    *,
    ssh_port: int,
    memory_mib: int = 768,
    shared: bool = True,
    workload: dict[str, Any] | None = None,
    mac: str | None = None,
    measure_kernel: bool = False,
    guest_net: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """A definition for the Debian guest: root on virtio-blk, a virtio NIC with ssh forwarded
    (or, with ``guest_net=(bridge, "ADDRESS/PREFIX")``, on that host bridge with that static
    address: the lab's guest network, where clients reach it directly)."""
    mac = mac or "52:54:00:" + ":".join(
        re.findall("..", hashlib.sha256(name.encode()).hexdigest()[:6])
    )
    ssh = {"proto": "tcp", "host_port": ssh_port, "guest_port": 22}
    nic: dict[str, Any] = {"id": "net0", "model": "virtio-net-pci", "mac": mac,
                           "backend": {"kind": "user", "forwards": [ssh]}}  # fmt: skip
    cmdline = image.cmdline()
    if guest_net is not None:
        nic["backend"] = {"kind": "bridge", "bridge": guest_net[0]}
        cmdline += f" tm.net={mac},{guest_net[1]}"
    root = {
        "id": "root",
        "path": str(disk),
        "format": "qcow2",
        "bus": "virtio-blk",
        "shared": shared,
    }
    return {
        "name": name,
        "memory_mib": memory_mib,
        "vcpus": 1,
        "boot": {
            "kind": "kernel",
            "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            "cmdline": cmdline,
        },
        "disks": [root],
        "nics": [nic],
        "workload": workload if workload is not None else {"mem_mib": 32},
    }


@dataclass(frozen=True)
class SshResult:
    """One ssh command run in the guest with the real OpenSSH client."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def ssh_argv(
    image: DebianImage, address: str, port: int, command: str, netns: str | None = None
) -> list[str]:
    """The OpenSSH client logging in as the test user with its key, from ``netns`` if given;
    the guest's host key is checked against the one recorded at build time."""
    argv = [
        "ssh", "-p", str(port), "-i", str(image.client_key),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={image.known_hosts}", "-o", "HostKeyAlias=tm-guest",
        "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10",
        "-o", "ServerAliveInterval=5", f"{TEST_USER}@{address}", command,
    ]  # fmt: skip
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def guest_ssh(
    image: DebianImage, address: str, port: int, command: str, *, timeout: float = 60.0,
    netns: str | None = None,
) -> SshResult:  # fmt: skip
    """Run ``command`` as the test user with its key (a different guest, or none, fails the
    login); from inside ``netns`` if given."""
    argv = ssh_argv(image, address, port, command, netns)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return SshResult(255, "", f"ssh timed out after {timeout:.0f}s")
    return SshResult(out.returncode, out.stdout, out.stderr.strip())


def password_login(
    image: DebianImage, address: str, port: int, password: str, *, timeout: float = 60.0
) -> SshResult:
    """Try a password login (never a key) as the test user with the real OpenSSH client; the
    password is handed over by an askpass helper, as an interactive user would type it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tm-askpass-") as tmp:
        helper = Path(tmp) / "askpass"
        secret = Path(tmp) / "password"
        secret.write_text(password)
        helper.write_text(f"#!/bin/sh\ncat {secret}\n")
        helper.chmod(0o700)
        env = {**os.environ, "SSH_ASKPASS": str(helper), "SSH_ASKPASS_REQUIRE": "force",
               "DISPLAY": ":0"}  # fmt: skip
        argv = [
            "ssh", "-p", str(port), "-o", "PubkeyAuthentication=no",
            "-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1",
            "-o", f"UserKnownHostsFile={image.known_hosts}", "-o", "HostKeyAlias=tm-guest",
            "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10",
            f"{TEST_USER}@{address}", "id -un",
        ]  # fmt: skip
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                 env=env, stdin=subprocess.DEVNULL, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            return SshResult(255, "", f"ssh timed out after {timeout:.0f}s")
    return SshResult(out.returncode, out.stdout, out.stderr.strip())


def wait_for_ssh(
    image: DebianImage, address: str, port: int, timeout: float = 180.0, netns: str | None = None
) -> SshResult:
    """Retry a login until sshd answers (it starts some seconds after the workload)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        res = guest_ssh(image, address, port, "true", timeout=30, netns=netns)
        if res.ok or time.monotonic() > deadline:
            return res
        time.sleep(2)
