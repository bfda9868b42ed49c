"""Encrypted disk images made and opened with qemu-img, the secrets QEMU is given, and where
the passphrase never appears."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from trustmig.hypervisor.accel import choose_accel
from trustmig.hypervisor.diskcrypt import (
    DiskCryptError,
    MasterKey,
    create_encrypted,
    encrypted_size,
    new_disk_key,
    passphrase,
    secret_pipe,
)
from trustmig.hypervisor.image import GuestImage
from trustmig.hypervisor.qemu import QemuVM
from trustmig.hypervisor.spec import DefinitionError, DiskSpec, VMSpec, parse_definition


def _disk(tmp_path: Path, fmt: str = "qcow2") -> DiskSpec:
    return DiskSpec(id="sec", path=tmp_path / f"sec.{fmt}", format=fmt, encrypt="luks",  # type: ignore[arg-type]
                    size_mib=8)  # fmt: skip


def _unwrap(master: MasterKey, fields: dict[str, str]) -> bytes:
    iv, data = base64.b64decode(fields["iv"]), base64.b64decode(fields["data"])
    dec = Cipher(algorithms.AES(master.key), modes.CBC(iv)).decryptor()
    unpad = padding.PKCS7(128).unpadder()
    return unpad.update(dec.update(data) + dec.finalize()) + unpad.finalize()


def test_master_key_wraps_what_qemu_decrypts() -> None:
    master, key = MasterKey(), new_disk_key()
    fields = master.wrap(passphrase(key))
    assert fields["keyid"] == "tm-master" and fields["format"] == "base64"
    assert _unwrap(master, fields) == passphrase(key)
    assert master.wrap(passphrase(key))["iv"] != fields["iv"]  # a fresh IV every time
    arg = master.disk_secret_arg("sec", key)
    assert passphrase(key).decode() not in arg and key.hex() not in arg


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_create_and_open_with_the_key_only(tmp_path: Path, fmt: str) -> None:
    d, key = _disk(tmp_path, fmt), new_disk_key()
    create_encrypted(d, 8 << 20, key)
    assert stat.S_IMODE(d.path.stat().st_mode) == 0o600
    assert encrypted_size(d, key) == 8 << 20
    data = d.path.read_bytes()
    assert passphrase(key) not in data and key not in data
    with pytest.raises(DiskCryptError, match=r"qemu-io failed: .*(keyslot|password)"):
        encrypted_size(d, new_disk_key())
    with pytest.raises(DiskCryptError, match="already exists"):
        create_encrypted(d, 8 << 20, key)


def test_secret_pipe_holds_the_data_once(tmp_path: Path) -> None:
    with secret_pipe(b"abc") as fd:
        assert os.read(fd, 10) == b"abc" and os.read(fd, 10) == b""
    with pytest.raises(DiskCryptError), secret_pipe(b"x" * 5000):
        pass


def _qemu(tmp_path: Path, incoming: bool) -> QemuVM:
    d = _disk(tmp_path).model_copy(update={"virtual_size": 8 << 20})
    spec = VMSpec(name="vm1", disks=[d])
    image = GuestImage(kernel=tmp_path / "k", initrd=tmp_path / "i", key="0" * 64)
    q = QemuVM(spec, image, tmp_path / "run", choose_accel(), incoming=incoming)
    q.disk_keys = {"sec": new_disk_key()}
    q.master = MasterKey()
    q._master_fd = 7
    return q


def test_argv_carries_only_the_wrapped_passphrase(tmp_path: Path) -> None:
    q = _qemu(tmp_path, incoming=False)
    key = q.disk_keys["sec"]
    argv = " ".join(q.argv())
    assert "secret,id=tm-master,file=/dev/fd/7,format=raw" in argv
    assert "encrypt.format=luks,encrypt.key-secret=tm-key-sec" in argv
    assert passphrase(key).decode() not in argv and key.hex() not in argv


def test_incoming_argv_has_a_placeholder_and_no_disk_secret(tmp_path: Path) -> None:
    argv = " ".join(_qemu(tmp_path, incoming=True).argv())
    assert "driver=null-co,node-name=tm-ph-sec,size=8388608" in argv
    assert "driver=raw,node-name=drive-sec,file=tm-ph-sec" in argv
    assert "tm-key-sec" not in argv and "sec.qcow2" not in argv


def test_size_only_for_encrypted_disks() -> None:
    with pytest.raises(DefinitionError, match="size_mib is only for encrypted disks"):
        parse_definition({"name": "vm1", "disks": [{"id": "d", "path": "/x", "size_mib": 4}]})
