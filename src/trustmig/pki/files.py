"""Small file helpers: atomic replacement, private key files, an exclusive CA lock.

Agents re-read ``crl.pem`` and ``issued.json`` while the CA may be rewriting them, so every write
goes to a temporary file in the same directory and is renamed into place: readers see either the
old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from trustmig.pki.errors import CaStoreError


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically with permission ``mode`` set before the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_private(path: Path, data: bytes) -> None:
    """Write a private key: mode 0600 from the first byte on."""
    write_atomic(path, data, mode=0o600)


def read_bytes(path: Path, what: str) -> bytes:
    """Read a file, turning a missing/unreadable file into a one-line :class:`CaStoreError`."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CaStoreError(f"{what} {path} does not exist: check the path") from None
    except OSError as exc:
        raise CaStoreError(f"cannot read {what} {path}: {exc.strerror}") from None


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory/.lock`` (serialises CA read-modify-write cycles)."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
