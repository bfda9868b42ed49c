"""Runtime memory measurement (the paper's §4.4 secure hypervisor, as an opt-in check).

A definition can name guest-physical regions that must arrive unchanged, typically the guest
kernel's code. QEMU writes each region to a private file (``pmemsave``), which is hashed and
deleted: on the source once its guest stopped for good, and on the destination before the guest
runs there. Both see the same frozen memory, so any difference is a change made in between.
The kernel's code is located from the section headers of the ELF kernel inside its bzImage
(Debian's ``System.map`` is a placeholder), and the guest boots with KASLR off.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from trustmig.hypervisor.qemu import QemuVM
from trustmig.hypervisor.spec import MeasuredRegion

PMEMSAVE_TIMEOUT_S = 60.0


class MeasurementError(Exception):
    """A region could not be measured (QEMU refused, or the file could not be read)."""


@dataclass(frozen=True)
class Measurement:
    """SHA-256 of every measured region, and how long measuring took."""

    digests: dict[str, str]
    elapsed_ms: float

    def differs_from(self, expected: dict[str, str]) -> list[str]:
        """Names of the regions whose digest is not the expected one (or missing)."""
        names = sorted(set(expected) | set(self.digests))
        return [n for n in names if expected.get(n) != self.digests.get(n)]


def kernel_text_region(vmlinuz: Path, name: str = "kernel-text") -> MeasuredRegion:
    """The guest kernel's code as a guest-physical region (KASLR off), read from the ELF
    section headers of the kernel inside a bzImage; raises MeasurementError."""
    elf = _vmlinux(vmlinuz.read_bytes())
    try:
        return _text_region(elf, name)
    except (struct.error, ValueError, IndexError) as e:
        raise MeasurementError(f"{vmlinuz}: cannot read the kernel's ELF headers ({e})") from None


def _vmlinux(bz: bytes) -> bytes:
    """The uncompressed kernel ELF from a bzImage (lz4, gzip, xz or zstd payload)."""
    if len(bz) < 0x250 or bz[0x202:0x206] != b"HdrS":
        raise MeasurementError("not a bzImage (no HdrS setup header)")
    setup_sects = bz[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bz, 0x248)
    payload = bz[(setup_sects + 1) * 512 + offset :][:length]
    try:
        if payload[:4] == b"\x02\x21\x4c\x18":
            return _tool(["lz4", "-d", "-c"], payload)
        if payload[:4] == b"\x28\xb5\x2f\xfd":
            return _tool(["zstd", "-d", "-c"], payload)
        if payload[:2] == b"\x1f\x8b":
            return gzip.decompress(payload)
        if payload[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(payload)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise MeasurementError(f"cannot decompress the kernel ({e})") from None
    raise MeasurementError("unknown kernel compression (lz4, zstd, gzip and xz are read)")


def _tool(argv: list[str], data: bytes) -> bytes:
    # lz4's legacy frame ends without an end mark: it reports an error after a complete output
    out = subprocess.run(argv, input=data, capture_output=True, timeout=60, check=False)
    if not out.stdout.startswith(b"\x7fELF"):
        raise MeasurementError(f"{argv[0]} could not decompress the kernel: install {argv[0]}")
    return out.stdout


def _text_region(elf: bytes, name: str) -> MeasuredRegion:
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]

    def section_name(off: int) -> str:
        start = names_at + off
        return elf[start : elf.index(b"\0", start)].decode()

    text = next(s for s in sections if section_name(s[0]) == ".text")
    vaddr, size = text[3], text[5]
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        kind, _flags, _off, p_vaddr, p_paddr, _fs, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", elf, phoff + i * phentsize
        )
        if kind == 1 and p_vaddr <= vaddr < p_vaddr + p_memsz:
            gpa = p_paddr + (vaddr - p_vaddr)
            return MeasuredRegion(name=name, gpa=gpa, size=(size + 4095) // 4096 * 4096)
    raise ValueError("no loadable segment holds .text")


async def measure(qemu: QemuVM, regions: list[MeasuredRegion]) -> Measurement:
    """Hash each region of the (stopped) guest's memory; raises MeasurementError."""
    t0 = time.monotonic()
    digests: dict[str, str] = {}
    for r in regions:
        path = qemu.sock_dir / f"measure-{r.name}.bin"
        try:
            await qemu.cmd("pmemsave", {"val": r.gpa, "size": r.size, "filename": str(path)},
                           timeout=PMEMSAVE_TIMEOUT_S)  # fmt: skip
            digests[r.name] = _sha256_and_remove(path)
        except MeasurementError:
            raise
        except Exception as e:  # noqa: BLE001 - QMP errors and timeouts alike
            raise MeasurementError(f"region {r.name} could not be read: {e}") from None
        finally:
            path.unlink(missing_ok=True)
    return Measurement(digests, round((time.monotonic() - t0) * 1000, 1))


def _sha256_and_remove(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            os.unlink(path)
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise MeasurementError(f"{path}: {e.strerror}") from None
    return h.hexdigest()
