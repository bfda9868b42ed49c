"""Build the tiny bootable guest every trustmig VM runs.

Migration tests need a guest that boots in seconds under TCG and reports on its own memory, so the
image is a stock Debian cloud kernel (serial console, tmpfs and initramfs support built in) plus an
initramfs holding busybox, ``/init`` and ``tm-workload`` (see ``guest/workload.c``).  Nothing is
installed on the host: the two ``.deb`` packages are fetched with ``apt-get download`` and unpacked
with ``dpkg-deb``, the workload is compiled with ``gcc -static``, and the initramfs is written by
this module directly (deterministic, and device nodes need no root).

Images are cached under a key that hashes every input (both packages, the guest sources and the
recipe version), because both hosts of a migration must boot the *same* image: the key is what
they compare.  A cached image is returned without touching apt; builds happen in a temporary
directory that is renamed into place, under a file lock, so an interrupted or concurrent build
never leaves a half image behind.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["GuestImage", "ImageBuildError", "build_image", "default_cache_dir", "sha256_file"]

#: Bump whenever the way an image is assembled changes (layout, compiler flags, initramfs).
RECIPE_VERSION = 2
#: the guest's NIC driver and what it needs, loaded by /init when a NIC has an address
NET_MODULES = (
    ("virtio_ring", r"kernel/drivers/virtio/virtio_ring\.ko"),
    ("virtio", r"kernel/drivers/virtio/virtio\.ko"),
    ("virtio_pci_legacy_dev", r"kernel/drivers/virtio/virtio_pci_legacy_dev\.ko"),
    ("virtio_pci_modern_dev", r"kernel/drivers/virtio/virtio_pci_modern_dev\.ko"),
    ("virtio_pci", r"kernel/drivers/virtio/virtio_pci\.ko"),
    ("failover", r"kernel/net/core/failover\.ko"),
    ("net_failover", r"kernel/drivers/net/net_failover\.ko"),
    ("virtio_net", r"kernel/drivers/net/virtio_net\.ko"),
)

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.gz"
IMAGE_RECORD = "image.json"
MANIFEST = "manifest.json"
DEBS_DIR = "debs"
GCC_FLAGS = ("-static", "-O2", "-pthread", "-Wall")
_TMP_PREFIX = ".tmp-"
_APT_TIMEOUT_S = 600.0


class ImageBuildError(Exception):
    """A guest image could not be built; the message says what failed and what to do."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: hand ``kernel`` and ``initrd`` to QEMU, compare ``key`` across hosts."""

    kernel: Path
    initrd: Path
    key: str


@dataclass(frozen=True)
class _Deb:
    """A downloaded package as the cache records it."""

    package: str
    file: str
    sha256: str

    def as_json(self) -> dict[str, str]:
        return {"package": self.package, "file": self.file, "sha256": self.sha256}


Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/trustmig/images``, or ``~/.cache/trustmig/images`` when unset."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "trustmig" / "images"


def build_image(
    cache_dir: Path | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> GuestImage:
    """Return the cached guest image, building it first if needed (or if ``force``).

    With a valid cache this only reads two small JSON files and hashes the image (well under a
    second) and never runs apt.  apt is consulted only when the cache holds no packages yet or
    when ``force`` is set.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    say: Progress = progress or (lambda _msg: None)
    sources = _guest_sources()
    if not force:
        cached = _cached_image(cache, sources)
        if cached is not None:
            return cached
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageBuildError(
            f"cannot create cache directory {cache}: {e.strerror}: pass a writable cache_dir"
        ) from e
    with _locked(cache):
        if not force:  # another process may have finished the same build while we waited
            cached = _cached_image(cache, sources)
            if cached is not None:
                return cached
        _remove_stale_temp_dirs(cache)
        debs = None if force else _debs_from_manifest(cache)
        if debs is None:
            debs = _fetch_debs(cache / DEBS_DIR, say)
        key = _image_key(debs, sources)
        image = _validated_image(cache, key)
        if image is None or force:
            image = _assemble(cache, key, debs, sources, say)
        _write_json_atomic(
            cache / MANIFEST,
            {"recipe": RECIPE_VERSION, "key": key, "debs": [d.as_json() for d in debs]},
        )
        say(f"guest image {key[:16]} ready in {cache / key}")
        return image


# ---- cache ----------------------------------------------------------------------------------


def _guest_sources() -> dict[str, bytes]:
    """The guest files shipped with the package: they are part of the image key."""
    guest = resources.files("trustmig.hypervisor").joinpath("guest")
    try:
        return {name: guest.joinpath(name).read_bytes() for name in ("workload.c", "init")}
    except OSError as e:
        raise ImageBuildError(
            f"guest sources missing from the trustmig package ({e}): reinstall trustmig"
        ) from e


def _image_key(debs: list[_Deb], sources: dict[str, bytes]) -> str:
    inputs = {
        "recipe": RECIPE_VERSION,
        "gcc_flags": list(GCC_FLAGS),
        "debs": [{"file": d.file, "sha256": d.sha256} for d in debs],
        "sources": {name: hashlib.sha256(data).hexdigest() for name, data in sources.items()},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _debs_from_manifest(cache: Path) -> list[_Deb] | None:
    """Packages recorded by the last build, if they are still in the cache and unchanged."""
    manifest = _read_json(cache / MANIFEST)
    if manifest is None or not isinstance(manifest.get("debs"), list):
        return None
    try:
        debs = [_Deb(d["package"], d["file"], d["sha256"]) for d in manifest["debs"]]
    except (KeyError, TypeError):
        return None
    for d in debs:
        path = cache / DEBS_DIR / d.file
        if not path.is_file() or sha256_file(path) != d.sha256:
            return None
    return debs if len(debs) == 2 else None


def _cached_image(cache: Path, sources: dict[str, bytes]) -> GuestImage | None:
    """The image the manifest points at, if its key still matches today's guest sources."""
    manifest = _read_json(cache / MANIFEST)
    if manifest is None or manifest.get("recipe") != RECIPE_VERSION:
        return None
    try:
        debs = [_Deb(d["package"], d["file"], d["sha256"]) for d in manifest["debs"]]
    except (KeyError, TypeError):
        return None
    key = _image_key(debs, sources)
    if manifest.get("key") != key:
        return None
    return _validated_image(cache, key)


def _validated_image(cache: Path, key: str) -> GuestImage | None:
    """An image directory counts only if its record matches the key and both files' hashes."""
    root = cache / key
    record = _read_json(root / IMAGE_RECORD)
    if record is None or record.get("key") != key:
        return None
    kernel, initrd = root / KERNEL_FILE, root / INITRD_FILE
    for path, field in ((kernel, "kernel_sha256"), (initrd, "initrd_sha256")):
        if not path.is_file() or sha256_file(path) != record.get(field):
            return None
    return GuestImage(kernel=kernel, initrd=initrd, key=key)


def _remove_stale_temp_dirs(cache: Path) -> None:
    """Leftovers of interrupted builds: safe to delete because builds hold the cache lock."""
    for entry in cache.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    with (cache / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX, suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---- apt ------------------------------------------------------------------------------------


def _run(argv: list[str], *, what: str, fix: str, cwd: Path | None = None) -> str:
    """Run a host tool; any failure becomes a one-line ImageBuildError."""
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=_APT_TIMEOUT_S, check=False
        )
    except FileNotFoundError as e:
        raise ImageBuildError(f"{argv[0]} not found: {fix}") from e
    except subprocess.TimeoutExpired as e:
        raise ImageBuildError(f"{what} timed out after {_APT_TIMEOUT_S:.0f}s: {fix}") from e
    if proc.returncode != 0:
        detail = _last_line(proc.stderr) or f"exit status {proc.returncode}"
        raise ImageBuildError(f"{what} failed ({detail}): {fix}")
    return proc.stdout


def _last_line(text: str) -> str:
    """The most telling line of a tool's stderr: its last error (``E: ...``), else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E: ")]
    return (errors or lines or [""])[-1]


def _apt_record(package: str) -> dict[str, str] | None:
    """apt's candidate record for ``package`` (Package, Version, SHA256...), or None if unknown."""
    try:
        proc = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", package],
            capture_output=True,
            text=True,
            timeout=_APT_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as e:
        raise ImageBuildError(
            "apt-cache not found: building the guest image needs a Debian host with apt"
        ) from e
    if proc.returncode != 0:
        return None
    record: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if not line.strip():
            if record:
                break
            continue
        m = re.match(r"^([A-Za-z0-9-]+):\s*(.*)$", line)
        if m:
            record[m.group(1)] = m.group(2)
    return record if "SHA256" in record and "Version" in record else None


def _kernel_package() -> str:
    """The cloud kernel the meta-package currently points at, unsigned flavour preferred."""
    out = _run(
        ["apt-cache", "depends", KERNEL_META_PACKAGE],
        what=f"apt-cache depends {KERNEL_META_PACKAGE}",
        fix="run apt-get update",
    )
    m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", out, re.MULTILINE)
    if m:
        for candidate in (f"{m.group(1)}-unsigned", m.group(1)):
            if _apt_record(candidate) is not None:
                return candidate
    raise ImageBuildError("no linux-image-*-cloud-amd64 package found in apt: run apt-get update")


def _fetch_debs(debs_dir: Path, say: Progress) -> list[_Deb]:
    """Resolve both packages with apt and download whichever is not already in ``debs_dir``."""
    say("resolving packages with apt-cache")
    kernel = _kernel_package()
    if _apt_record(BUSYBOX_PACKAGE) is None:
        raise ImageBuildError(f"no {BUSYBOX_PACKAGE} package found in apt: run apt-get update")
    debs_dir.mkdir(parents=True, exist_ok=True)
    return [_fetch_deb(debs_dir, pkg, say) for pkg in (kernel, BUSYBOX_PACKAGE)]


def _fetch_deb(debs_dir: Path, package: str, say: Progress) -> _Deb:
    record = _apt_record(package)
    if record is None:
        raise ImageBuildError(f"no {package} package found in apt: run apt-get update")
    want = record["SHA256"]
    for existing in sorted(debs_dir.glob(f"{package}_*.deb")):
        if sha256_file(existing) == want:
            say(f"using cached {existing.name}")
            return _Deb(package, existing.name, want)
    say(f"downloading {package} {record['Version']} with apt-get download")
    with tempfile.TemporaryDirectory(dir=debs_dir, prefix=_TMP_PREFIX) as tmp:
        _run(
            ["apt-get", "download", "-q", package],
            cwd=Path(tmp),
            what=f"apt-get download {package}",
            fix=f"check access to the Debian mirror, or copy the .deb into {debs_dir}",
        )
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise ImageBuildError(
                f"apt-get download {package} produced {len(got)} .deb files: run apt-get clean "
                "and retry"
            )
        if sha256_file(got[0]) != want:
            raise ImageBuildError(
                f"downloaded {got[0].name} does not match apt's SHA256: "
                "run apt-get update and retry"
            )
        os.replace(got[0], debs_dir / got[0].name)
        return _Deb(package, got[0].name, want)


# ---- assembly -------------------------------------------------------------------------------


GUEST_DIRS = ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/net")


def _assemble(
    cache: Path, key: str, debs: list[_Deb], sources: dict[str, bytes], say: Progress
) -> GuestImage:
    """Build into a temporary directory and rename it to ``cache/<key>`` once complete."""
    kernel_deb, busybox_deb = (cache / DEBS_DIR / d.file for d in debs)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=_TMP_PREFIX))
    try:
        tmp.chmod(0o755)  # QEMU may run as another user than the builder
        say(f"extracting kernel and NIC modules from {kernel_deb.name}")
        wanted = {re.compile(r"^\./boot/vmlinuz-[^/]+$"): tmp / KERNEL_FILE}
        for mod, path in NET_MODULES:
            wanted[re.compile(rf"^\./lib/modules/[^/]+/{path}$")] = tmp / f"{mod}.ko"
        _extract_members(kernel_deb, wanted)
        modules = [(m, (tmp / f"{m}.ko").read_bytes()) for m, _ in NET_MODULES]
        say(f"extracting busybox from {busybox_deb.name}")
        busybox = tmp / "busybox"
        _extract_member(busybox_deb, re.compile(r"^\./bin/busybox$"), busybox)
        say("compiling tm-workload")
        workload = _compile_workload(sources["workload.c"], tmp)
        say("packing initramfs")
        cpio = _newc_archive(
            [
                _Entry.directory("."),
                *(_Entry.directory(d) for d in GUEST_DIRS),
                *(_Entry.file(f"lib/net/{m}.ko", data) for m, data in modules),
                _Entry.device("dev/console", major=5, minor=1, perm=0o600),
                _Entry.device("dev/null", major=1, minor=3, perm=0o666),
                _Entry.file("init", sources["init"]),
                _Entry.file("bin/busybox", busybox.read_bytes()),
                _Entry.symlink("bin/sh", "busybox"),
                _Entry.file("bin/tm-workload", workload),
            ]
        )
        (tmp / INITRD_FILE).write_bytes(gzip.compress(cpio, compresslevel=9, mtime=0))
        busybox.unlink()
        for m, _ in NET_MODULES:
            (tmp / f"{m}.ko").unlink()
        record = {
            "key": key,
            "recipe": RECIPE_VERSION,
            "debs": [d.as_json() for d in debs],
            "kernel_sha256": sha256_file(tmp / KERNEL_FILE),
            "initrd_sha256": sha256_file(tmp / INITRD_FILE),
        }
        _write_json_atomic(tmp / IMAGE_RECORD, record)
        final = cache / key
        if final.exists():  # an invalid leftover, or the image a forced build replaces
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return GuestImage(kernel=final / KERNEL_FILE, initrd=final / INITRD_FILE, key=key)


def _extract_member(deb: Path, name: re.Pattern[str], dest: Path) -> None:
    """Stream the package's data tar and copy out the single file matching ``name``."""
    _extract_members(deb, {name: dest})


def _extract_members(deb: Path, wanted: dict[re.Pattern[str], Path]) -> None:
    """Stream the package's data tar and copy out one file per pattern in ``wanted``.

    ``dpkg-deb --fsys-tarfile`` instead of ``dpkg-deb -x``: the kernel package also carries about
    100 MB of modules the guest never loads, and streaming stops as soon as the file is found.
    """
    try:
        proc = subprocess.Popen(
            ["dpkg-deb", "--fsys-tarfile", str(deb)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError as e:
        raise ImageBuildError("dpkg-deb not found: install dpkg") from e
    assert proc.stdout is not None
    left = dict(wanted)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                hit = next((p for p in left if member.isfile() and p.match(member.name)), None)
                if hit is None:
                    continue
                src = tar.extractfile(member)
                assert src is not None
                with left.pop(hit).open("wb") as out:
                    shutil.copyfileobj(src, out)
                if not left:
                    break
    except tarfile.TarError as e:
        raise ImageBuildError(f"cannot read {deb.name} ({e}): delete it and build again") from e
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    if left:
        detail = _last_line(err.decode(errors="replace"))
        missing = next(iter(left)).pattern.strip("^$")
        raise ImageBuildError(
            f"{deb.name} holds no {missing}"
            + (f" ({detail})" if detail else "")
            + ": delete it and build again with force=True"
        )
    for dest in wanted.values():
        dest.chmod(0o755)


def _compile_workload(source: bytes, workdir: Path) -> bytes:
    src, exe = workdir / "workload.c", workdir / "tm-workload"
    src.write_bytes(source)
    _run(
        ["gcc", *GCC_FLAGS, "-o", str(exe), str(src), "-lm"],
        what="compiling workload.c with gcc -static",
        fix="install gcc and libc6-dev (static glibc)",
    )
    data = exe.read_bytes()
    src.unlink()
    exe.unlink()
    return data


@dataclass(frozen=True)
class _Entry:
    """One initramfs member; ``data`` is the file content or the symlink target."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def directory(cls, name: str) -> _Entry:
        return cls(name, stat.S_IFDIR | 0o755)

    @classmethod
    def file(cls, name: str, data: bytes) -> _Entry:
        return cls(name, stat.S_IFREG | 0o755, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> _Entry:
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def device(cls, name: str, *, major: int, minor: int, perm: int) -> _Entry:
        return cls(name, stat.S_IFCHR | perm, b"", (major, minor))


def _newc_archive(entries: list[_Entry]) -> bytes:
    """A "newc" cpio archive (the format the kernel unpacks), owned by root, mtime 0."""

    def pad(n: int) -> bytes:
        return b"\0" * (-n % 4)

    out = bytearray()
    for ino, entry in enumerate([*entries, _Entry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        is_dir = stat.S_ISDIR(entry.mode)
        fields = (
            ino if entry.mode else 0,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if is_dir else 1,  # nlink
            0,  # mtime
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name
        out += pad(len(header) + len(name))
        out += entry.data + pad(len(entry.data))
    return bytes(out)
