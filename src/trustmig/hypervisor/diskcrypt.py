"""Disks encrypted at rest with QEMU's native LUKS (qcow2 ``encrypt.format=luks`` or raw LUKS).

A disk key is 32 random bytes made by trustmig; QEMU's LUKS passphrase is its base64 text. The
key never reaches a command line, an environment or a file in plaintext:

* every QEMU (and ``qemu-img``) that needs a disk key gets a fresh 32-byte *master key* through
  an inherited pipe (``-object secret,file=/dev/fd/N``; the pipe is empty once QEMU read it);
* each disk passphrase is then handed over AES-256-CBC encrypted under that master key
  (``secret,keyid=tm-master,iv=...``), on the command line or over QMP (``object-add``), the
  way libvirt hands secrets to QEMU.

The high-entropy passphrase needs no stretching, so images are made with a short PBKDF time
(``ITER_TIME_MS``): opening a disk costs milliseconds, not the two seconds of the default.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from trustmig.hypervisor.spec import DiskSpec

KEY_SIZE = 32
MASTER_ID = "tm-master"
ITER_TIME_MS = 10
#: QEMU's PBKDF benchmark reads thread CPU time, too coarse here now and then; it is retried
_FLAKY_BENCHMARK = "Unable to get accurate CPU usage"


class DiskCryptError(Exception):
    """An encrypted disk could not be created or opened (the message names disk and cause)."""


def new_disk_key() -> bytes:
    return os.urandom(KEY_SIZE)


def passphrase(key: bytes) -> bytes:
    """The LUKS passphrase QEMU sees for a disk key (its base64 text)."""
    if len(key) != KEY_SIZE:
        raise DiskCryptError(f"a disk key is {KEY_SIZE} bytes, not {len(key)}")
    return base64.b64encode(key)


def secret_id(disk_id: str) -> str:
    return f"tm-key-{disk_id}"


class MasterKey:
    """The per-process key that disk passphrases travel under to one QEMU."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key or os.urandom(KEY_SIZE)

    def wrap(self, secret: bytes) -> dict[str, str]:
        """``secret`` as QEMU's encrypted secret fields (data, iv, format)."""
        iv = os.urandom(16)
        padder = padding.PKCS7(128).padder()
        padded = padder.update(secret) + padder.finalize()
        enc = Cipher(algorithms.AES(self.key), modes.CBC(iv)).encryptor()
        data = enc.update(padded) + enc.finalize()
        return {"data": base64.b64encode(data).decode(), "iv": base64.b64encode(iv).decode(),
                "format": "base64", "keyid": MASTER_ID}  # fmt: skip

    def disk_secret_arg(self, disk_id: str, key: bytes) -> str:
        """``-object`` value of a disk's passphrase, encrypted under this master key."""
        w = self.wrap(passphrase(key))
        return (f"secret,id={secret_id(disk_id)},data={w['data']},keyid={MASTER_ID},"
                f"iv={w['iv']},format=base64")  # fmt: skip

    def disk_secret_qmp(self, disk_id: str, key: bytes) -> dict[str, Any]:
        """``object-add`` arguments of a disk's passphrase, encrypted under this master key."""
        return {"qom-type": "secret", "id": secret_id(disk_id), **self.wrap(passphrase(key))}


@contextlib.contextmanager
def secret_pipe(data: bytes) -> Iterator[int]:
    """A pipe already holding ``data`` (and closed for writing): its read end, to be inherited
    by one child as ``/dev/fd/N``; closed here afterwards."""
    if len(data) > 4096:
        raise DiskCryptError("a secret pipe holds at most 4 KiB")
    r, w = os.pipe()
    try:
        os.write(w, data)
    finally:
        os.close(w)
    try:
        yield r
    finally:
        os.close(r)


def drive_options(d: DiskSpec) -> str:
    """The ``-drive`` format options of an encrypted disk (its secret object must exist)."""
    if d.format == "qcow2":
        return f"format=qcow2,encrypt.format=luks,encrypt.key-secret={secret_id(d.id)}"
    return f"format=luks,key-secret={secret_id(d.id)}"


def blockdev_options(d: DiskSpec, node_name: str) -> dict[str, Any]:
    """``blockdev-add`` arguments that open an encrypted disk (its secret object must exist)."""
    direct = d.cache in ("none", "directsync")
    file = {"driver": "file", "filename": str(d.path), "cache": {"direct": direct},
            "read-only": d.read_only}  # fmt: skip
    opts: dict[str, Any] = {"node-name": node_name, "file": file, "read-only": d.read_only}
    if d.format == "qcow2":
        return {**opts, "driver": "qcow2",
                "encrypt": {"format": "luks", "key-secret": secret_id(d.id)}}  # fmt: skip
    return {**opts, "driver": "luks", "key-secret": secret_id(d.id)}


def _qemu_img(args: list[str], key: bytes, what: str, tool: str = "qemu-img") -> str:
    """Run qemu-img (or qemu-io) with the disk's passphrase as secret ``k`` (from a pipe)."""
    sub = [args[0]] if tool == "qemu-img" else []
    rest = args[1:] if tool == "qemu-img" else args
    for _attempt in range(5):
        with secret_pipe(passphrase(key)) as fd:
            out = subprocess.run(
                [tool, *sub, "--object", f"secret,id=k,file=/dev/fd/{fd}", *rest],
                pass_fds=[fd], capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
        if out.returncode == 0 and "failed" not in out.stderr.lower():
            return out.stdout
        if _FLAKY_BENCHMARK not in out.stderr:
            break
    last = (out.stderr.strip().splitlines() or out.stdout.strip().splitlines() or ["?"])[-1]
    raise DiskCryptError(f"{what}: {tool} {' '.join(sub)} failed: {last}".replace("  ", " "))


def create_encrypted(d: DiskSpec, size: int, key: bytes) -> None:
    """A new, empty LUKS-encrypted image at ``d.path`` of ``size`` bytes (0600)."""
    if d.path.exists():
        raise DiskCryptError(f"disk {d.id}: {d.path} already exists")
    d.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    luks = f"key-secret=k,iter-time={ITER_TIME_MS}"
    if d.format == "qcow2":
        prefixed = ",".join(f"encrypt.{o}" for o in luks.split(","))
        fmt, opts = "qcow2", f"encrypt.format=luks,{prefixed}"
    else:
        fmt, opts = "luks", luks
    old = os.umask(0o077)
    try:
        _qemu_img(["create", "-q", "-f", fmt, "-o", opts, str(d.path), str(size)], key,
                  f"disk {d.id}")  # fmt: skip
    finally:
        os.umask(old)
    d.path.chmod(0o600)


def encrypted_size(d: DiskSpec, key: bytes) -> int:
    """The virtual size of an encrypted image, after proving that ``key`` unlocks it (a read
    through its LUKS layer: ``qemu-img info`` alone reads no key slot)."""
    if d.format == "qcow2":
        opts = f"driver=qcow2,file.filename={qemu_path_opt(d.path)},encrypt.key-secret=k"
    else:
        opts = f"driver=luks,file.filename={qemu_path_opt(d.path)},key-secret=k"
    what = f"disk {d.id} ({d.path})"
    _qemu_img(["-U", "-r", "--image-opts", opts, "-c", "read 0 512"], key, what, tool="qemu-io")
    out = _qemu_img(["info", "-U", "--output=json", "--image-opts", opts], key, what)
    try:
        return int(json.loads(out)["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise DiskCryptError(f"disk {d.id}: qemu-img info gave no virtual size") from None


def qemu_path_opt(path: Path) -> str:
    """A path inside a QEMU option string (commas are doubled there)."""
    return str(path).replace(",", ",,")
