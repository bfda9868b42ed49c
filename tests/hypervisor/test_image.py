"""Guest image build: cache behaviour, atomicity, contents, errors, and one real TCG boot."""

from __future__ import annotations

import gzip
import itertools
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from trustmig.hypervisor import image as image_mod
from trustmig.hypervisor.console_protocol import (
    CheckResult,
    Paused,
    Ready,
    SecretAt,
    parse_console_line,
)
from trustmig.hypervisor.image import (
    GuestImage,
    ImageBuildError,
    _Entry,
    _newc_archive,
    build_image,
    default_cache_dir,
)

from .line_stream import LineStream

needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs a Debian host")


# ---- pure helpers ---------------------------------------------------------------------------


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "trustmig" / "images"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "trustmig" / "images"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "trustmig" / "images"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio")
def test_newc_archive_is_read_by_cpio(tmp_path: Path) -> None:
    archive = _newc_archive(
        [
            _Entry.directory("."),
            _Entry.directory("bin"),
            _Entry.file("bin/prog", b"#!/bin/sh\necho hi\n"),
            _Entry.symlink("bin/sh", "busybox"),
            _Entry.device("console", major=5, minor=1, perm=0o600),
        ]
    )
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    lines = listing.splitlines()
    assert [ln.split()[-1] for ln in lines[:3]] == [".", "bin", "bin/prog"]
    assert lines[3].startswith("lrwxrwxrwx") and lines[3].endswith("bin/sh -> busybox")
    assert lines[4].startswith("crw-------") and "5,   1" in lines[4]
    subprocess.run(
        ["cpio", "-id", "--quiet", "bin/prog"],
        input=archive,
        cwd=tmp_path,
        check=True,
    )
    assert (tmp_path / "bin" / "prog").read_bytes() == b"#!/bin/sh\necho hi\n"


# ---- builds ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def built_image() -> GuestImage:
    """The image in the default cache: built once (downloads about 28 MB), then reused."""
    if shutil.which("apt-get") is None:
        pytest.skip("building the guest image needs a Debian host with apt")
    return build_image()


@pytest.fixture
def apt_tripwire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Puts apt-get/apt-cache first on PATH that only log their use and fail."""
    bindir, log = tmp_path / "tripwire", tmp_path / "apt-calls.log"
    bindir.mkdir()
    for tool in ("apt-get", "apt-cache"):
        script = bindir / tool
        script.write_text(f'#!/bin/sh\necho {tool} "$@" >> {log}\nexit 1\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{Path('/usr/bin')}:{Path('/bin')}")
    return log


def _copy_cache(src: Path, dst: Path) -> Path:
    """A private cache holding the default cache's packages and manifest (no apt needed)."""
    (dst / "debs").mkdir(parents=True)
    for deb in (src / "debs").glob("*.deb"):
        shutil.copy(deb, dst / "debs" / deb.name)
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    return dst


def test_built_image_contents(built_image: GuestImage) -> None:
    kernel = built_image.kernel.read_bytes()
    assert kernel[0x202:0x206] == b"HdrS", "kernel is not a bzImage"
    cpio = gzip.decompress(built_image.initrd.read_bytes())
    names = (
        subprocess.run(["cpio", "-it", "--quiet"], input=cpio, capture_output=True, check=True)
        .stdout.decode()
        .split()
    )
    for name in ("init", "bin/busybox", "bin/sh", "bin/tm-workload", "dev/console", "dev/null",
                 "lib/net/virtio_pci.ko", "lib/net/virtio_net.ko"):  # fmt: skip
        assert name in names
    guest = resources.files("trustmig.hypervisor").joinpath("guest")
    assert guest.joinpath("init").read_bytes() in cpio
    assert len(built_image.key) == 64 and built_image.kernel.parent.name == built_image.key
    manifest = json.loads((built_image.kernel.parent.parent / "manifest.json").read_text())
    assert manifest["key"] == built_image.key
    assert {d["package"] for d in manifest["debs"]} >= {"busybox-static"}


def test_cached_image_is_returned_without_apt(built_image: GuestImage, apt_tripwire: Path) -> None:
    messages: list[str] = []
    again = build_image(built_image.kernel.parent.parent, progress=messages.append)
    assert again == built_image
    assert messages == []
    assert not apt_tripwire.exists()


def test_changed_inputs_rebuild_from_cached_packages_without_apt(
    built_image: GuestImage, apt_tripwire: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _copy_cache(built_image.kernel.parent.parent, tmp_path / "cache")
    monkeypatch.setattr(image_mod, "RECIPE_VERSION", image_mod.RECIPE_VERSION + 1000)
    rebuilt = build_image(cache)
    assert rebuilt.key != built_image.key
    assert rebuilt.kernel.read_bytes() == built_image.kernel.read_bytes()
    assert rebuilt.initrd.stat().st_size > 0
    assert not apt_tripwire.exists()
    assert not list(cache.glob(".tmp-*"))


def test_corrupt_image_and_leftovers_are_replaced(
    built_image: GuestImage, apt_tripwire: Path, tmp_path: Path
) -> None:
    cache = _copy_cache(built_image.kernel.parent.parent, tmp_path / "cache")
    # an interrupted build and a truncated image, as a crash could leave them
    (cache / ".tmp-interrupted").mkdir()
    (cache / ".tmp-interrupted" / "vmlinuz").write_bytes(b"half")
    shutil.copytree(built_image.kernel.parent, cache / built_image.key)
    (cache / built_image.key / "initrd.gz").write_bytes(b"truncated")
    image = build_image(cache)
    assert image.key == built_image.key
    assert image.initrd.read_bytes() != b"truncated"
    assert gzip.decompress(image.initrd.read_bytes())[:6] == b"070701"
    assert not list(cache.glob(".tmp-*"))
    assert not apt_tripwire.exists()


def test_concurrent_builds_produce_one_image(
    built_image: GuestImage, apt_tripwire: Path, tmp_path: Path
) -> None:
    cache = _copy_cache(built_image.kernel.parent.parent, tmp_path / "cache")
    results: list[GuestImage | BaseException] = []

    def build() -> None:
        try:
            results.append(build_image(cache))
        except BaseException as e:
            results.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] and isinstance(results[0], GuestImage)
    assert [p.name for p in cache.iterdir() if len(p.name) == 64] == [built_image.key]
    assert not apt_tripwire.exists()


@needs_apt
def test_download_failure_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no route to the mirror: apt's proxy points at a closed loopback port
    conf = tmp_path / "apt.conf"
    conf.write_text(
        'Acquire::http::Proxy "http://127.0.0.1:9/";\n'
        'Acquire::https::Proxy "http://127.0.0.1:9/";\n'
        'Acquire::Retries "0";\n'
    )
    monkeypatch.setenv("APT_CONFIG", str(conf))
    cache = tmp_path / "cache"
    with pytest.raises(ImageBuildError) as exc:
        build_image(cache)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("apt-get download linux-image-")
    assert "check access to the Debian mirror" in message
    assert not (cache / "manifest.json").exists()
    assert not [p for p in cache.iterdir() if p.name not in {".lock", "debs"}]
    assert not list((cache / "debs").iterdir())


def test_unwritable_cache_dir_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ImageBuildError, match=r"cannot create cache directory .*pass a writable"):
        build_image(blocker / "images")


# ---- boot -----------------------------------------------------------------------------------


class Guest:
    def __init__(self, proc: subprocess.Popen[bytes], stream: LineStream, started: float) -> None:
        self.proc = proc
        self.stream = stream
        self.started = started


@pytest.fixture
def boot_guest(built_image: GuestImage) -> Iterator[object]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="tm-guest-"))
    procs: list[subprocess.Popen[bytes]] = []
    socks: list[socket.socket] = []

    def boot(append: str, memory_mib: int = 256) -> Guest:
        serial = tmp / "serial.sock"
        started = time.monotonic()
        log = (tmp / "qemu.log").open("wb")
        proc = subprocess.Popen(
            [
                "qemu-system-x86_64",
                "-accel", "tcg", "-cpu", "qemu64", "-m", str(memory_mib), "-smp", "1",
                "-nodefaults", "-display", "none", "-no-reboot",
                "-kernel", str(built_image.kernel), "-initrd", str(built_image.initrd),
                "-append", f"console=ttyS0 quiet loglevel=1 panic=-1 {append}",
                "-chardev", f"socket,id=s0,path={serial},server=on,wait=off",
                "-serial", "chardev:s0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        procs.append(proc)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        socks.append(sock)
        deadline = time.monotonic() + 30
        while True:
            try:
                sock.connect(str(serial))
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"QEMU serial socket never appeared: {(tmp / 'qemu.log').read_text()}"
                    ) from None
                time.sleep(0.05)
        return Guest(proc, LineStream(lambda: sock.recv(65536), sock.sendall), started)

    try:
        yield boot
    finally:
        for sock in socks:
            sock.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.vm
def test_guest_boots_and_its_memory_checks_clean(boot_guest) -> None:
    guest = boot_guest("tm.mem_mib=32 tm.dirty_rate=8")
    ready = guest.stream.wait_line("READY", 180)
    boot_to_ready = time.monotonic() - guest.started
    assert parse_console_line(ready) == Ready(32, 64)
    print(f"\nboot-to-READY: {boot_to_ready:.1f} s")

    beats = guest.stream.collect_heartbeats(50, timeout=60)
    assert [b.seq for b in beats] == list(range(beats[0].seq, beats[0].seq + 50))
    assert all(b.mono_ns > a.mono_ns for a, b in itertools.pairwise(beats))

    for _ in range(2):
        result = guest.stream.command("check", "CHECK ", timeout=120)
        assert isinstance(result, CheckResult)
        assert (result.pages, result.bad_pages, result.first_bad) == (32 * 256, 0, -1)
        assert (result.marker_ok, result.marker_total) == (64, 64)

    assert guest.stream.command("pause", "PAUSED") == Paused()
    frozen = guest.stream.command("check", "CHECK ", timeout=120)
    again = guest.stream.command("check", "CHECK ", timeout=120)
    assert isinstance(frozen, CheckResult) and isinstance(again, CheckResult)
    assert frozen.digest == again.digest
    assert isinstance(guest.stream.command("secret", "SECRET_AT"), SecretAt)
    assert "MARKER_MISMATCH" not in " ".join(guest.stream.transcript)
    assert guest.proc.poll() is None
