"""Supervision of a software TPM (swtpm) standing in for a host's hardware TPM.

Each simulated host gets its own swtpm process with its own NVRAM state directory. The state is
"manufactured" once with ``swtpm_setup`` (EK + EK certificate signed by a local manufacturer CA),
like a TPM vendor would, and then served on two loopback TCP ports (command + control).

Why these choices:
- swtpm runs in the foreground as our child (no ``--daemon``): we own its PID, can kill exactly it,
  and ``--daemon``'s chdir to ``/`` cannot bite relative paths (all paths are made absolute anyway).
- ``startup-clear`` on every start: PCRs begin at zero each launch, like a host reboot, so the
  measured launch always starts from a known state.
- Ports are chosen by the kernel (bind to port 0) and the start is retried if another process took
  them in the meantime.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from trustmig.attest.errors import TpmUnavailable

if TYPE_CHECKING:
    from trustmig.attest.tpm import HostTpm

TPM_DEVICE = Path("/dev/tpmrm0")
_READY_TIMEOUT_S = 5.0
_START_ATTEMPTS = 3


def _free_port_pair() -> tuple[int, int]:
    """Return free loopback TCP ports P and P+1.

    The swtpm TCTI of libtss2 always talks to the control channel on the command port + 1, so the
    two ports must be consecutive.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port, port + 1
    raise TpmUnavailable("no two consecutive free loopback ports for swtpm; free some ports")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes
    import signal as _signal

    ctypes.CDLL(None, use_errno=True).prctl(1, _signal.SIGKILL)  # PR_SET_PDEATHSIG


class SwtpmProcess:
    """One supervised swtpm instance for one simulated host.

    Layout under ``state_dir`` (made absolute): ``nvram/`` (TPM state), ``ca/`` (the manufacturer
    CA that signed the EK certificate, unless ``ca_dir`` points to a CA shared by several hosts),
    ``swtpm.log``.
    """

    def __init__(self, state_dir: Path, *, ca_dir: Path | None = None) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.ca_dir = Path(ca_dir).absolute() if ca_dir is not None else self.state_dir / "ca"
        self.port = 0
        self.ctrl_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def nvram_dir(self) -> Path:
        return self.state_dir / "nvram"

    @property
    def manufacturer_ca_cert(self) -> Path:
        """Issuer certificate of the EK certificate (the cluster may pin it to check EK certs)."""
        return self.ca_dir / "issuercert.pem"

    @property
    def tcti(self) -> str:
        if not self.is_running():
            raise TpmUnavailable(f"swtpm for {self.state_dir} is not running; call start() first")
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- manufacturing --------------------------------------------------------------------------
    def _manufacture(self) -> None:
        """Create the TPM state with an EK and an EK certificate, once per state directory."""
        if (self.nvram_dir / "tpm2-00.permall").exists():
            return
        setup = shutil.which("swtpm_setup")
        localca = shutil.which("swtpm_localca")
        if setup is None or localca is None:
            raise TpmUnavailable(
                "swtpm_setup/swtpm_localca not found; install the 'swtpm-tools' package"
            )
        self.nvram_dir.mkdir(parents=True, exist_ok=True)
        self.ca_dir.mkdir(parents=True, exist_ok=True)
        conf_dir = self.state_dir / "setup"
        conf_dir.mkdir(exist_ok=True)
        ca_conf = conf_dir / "swtpm-localca.conf"
        ca_conf.write_text(
            f"statedir = {self.ca_dir}\n"
            f"signingkey = {self.ca_dir / 'signkey.pem'}\n"
            f"issuercert = {self.ca_dir / 'issuercert.pem'}\n"
            f"certserial = {self.ca_dir / 'certserial'}\n"
        )
        ca_opts = conf_dir / "swtpm-localca.options"
        ca_opts.write_text(
            "--platform-manufacturer trustmig\n--platform-version 1.0\n--platform-model swtpm\n"
        )
        setup_conf = conf_dir / "swtpm_setup.conf"
        setup_conf.write_text(
            f"create_certs_tool = {localca}\n"
            f"create_certs_tool_config = {ca_conf}\n"
            f"create_certs_tool_options = {ca_opts}\n"
            "active_pcr_banks = sha256\n"
        )
        cmd = [
            setup,
            "--tpm2",
            "--tpmstate",
            str(self.nvram_dir),
            "--create-ek-cert",
            "--create-platform-cert",
            "--overwrite",
            "--config",
            str(setup_conf),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if res.returncode != 0:
            last = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise TpmUnavailable(
                f"swtpm_setup failed for {self.nvram_dir} ({last[0]}); "
                "delete the directory and retry"
            )

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Manufacture the state if needed, start swtpm and wait until it accepts commands."""
        if self.is_running():
            return
        binary = shutil.which("swtpm")
        if binary is None:
            raise TpmUnavailable("swtpm not found; install the 'swtpm' package")
        self._manufacture()
        log = self.state_dir / "swtpm.log"
        last_error = "unknown"
        for _ in range(_START_ATTEMPTS):
            port, ctrl = _free_port_pair()
            cmd = [
                binary,
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.nvram_dir}",
                "--server",
                f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
                "--log",
                f"file={log},level=1",
            ]
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=self.state_dir,
                # a host's TPM lives and dies with its agent, even when the agent is killed
                preexec_fn=_die_with_parent,
            )
            if self._wait_ready(proc, port):
                self._proc, self.port, self.ctrl_port = proc, port, ctrl
                return
            last_error = self._reap(proc)
        raise TpmUnavailable(f"swtpm did not start for {self.state_dir} ({last_error}); see {log}")

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[bytes], port: int) -> bool:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.2),
            ):
                return True
            time.sleep(0.01)
        return False

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> str:
        if proc.poll() is None:
            proc.kill()
        try:
            _, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            return "did not exit"
        lines = (err or b"").decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"exit code {proc.returncode}"

    def stop(self) -> None:
        """Stop our swtpm (by its own PID only). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> SwtpmProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def open_tpm(state_dir: Path, *, prefer_device: bool = True, ca_dir: Path | None = None) -> HostTpm:
    """Open this host's TPM: the kernel resource manager when present, else a supervised swtpm.

    The swtpm (state in ``state_dir/swtpm``) is owned by the returned HostTpm and stopped by its
    ``close()``.
    """
    from trustmig.attest.tpm import HostTpm

    if prefer_device and TPM_DEVICE.exists():
        if not os.access(TPM_DEVICE, os.R_OK | os.W_OK):
            raise TpmUnavailable(
                f"{TPM_DEVICE} exists but is not accessible; add the agent user to the 'tss' group "
                "or pass prefer_device=False to use a software TPM"
            )
        return HostTpm(f"device:{TPM_DEVICE}", kind="device")
    proc = SwtpmProcess(Path(state_dir).absolute() / "swtpm", ca_dir=ca_dir)
    proc.start()
    try:
        return HostTpm(proc.tcti, kind="swtpm", process=proc)
    except BaseException:
        proc.stop()
        raise
