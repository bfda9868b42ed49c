"""A throwaway PostgreSQL server for tests and local clusters.

Debian's binaries, a temporary directory owned by the ``postgres`` user (initdb refuses to run
as root), loopback TCP only, stopped by its PID."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "trustmig"


def _bin_dir() -> Path:
    root = Path("/usr/lib/postgresql")
    versions = sorted((p for p in root.glob("*/bin") if (p / "initdb").exists()),
                      key=lambda p: int(p.parent.name))  # fmt: skip
    if not versions:
        raise RuntimeError("PostgreSQL is not installed: run scripts/bootstrap")
    return versions[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """``start()``, ``url``, ``kill()`` (SIGKILL, as a crash), ``start()`` again, ``stop()``."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="trustmig-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.pid: int | None = None
        self.bin = _bin_dir()
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        res = subprocess.run([*self._as, *argv], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            log = self.root / "log"
            tail = log.read_text()[-600:] if log.exists() else ""
            raise RuntimeError(f"{Path(argv[0]).name} failed ({res.returncode}): "
                               f"{res.stderr.strip()[-400:]} {tail}")  # fmt: skip

    def start(self) -> PgServer:
        if not self.data.exists():
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", USER)
        opts = f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts,
                  "-l", str(self.root / "log"), "-w", "start")  # fmt: skip
        self.pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return self

    def kill(self) -> None:
        """The database host dies: SIGKILL the postmaster (its backends exit with it)."""
        if self.pid is None:
            return
        family = [self.pid, *_children(self.pid)]  # the whole server dies, backends with it
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in family):
            time.sleep(0.05)
        self.pid = None
        # a crashed server leaves its lock files; the next start would refuse them
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.root.glob(".s.PGSQL.*"):
            lock.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(subprocess.SubprocessError, OSError, RuntimeError):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                          "stop")  # fmt: skip
            if self.pid is not None and _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
            self.pid = None
        shutil.rmtree(self.root, ignore_errors=True)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
