"""Choose the accelerator QEMU runs guests with.

KVM is used when the host really offers hardware virtualisation. A `/dev/kvm` node alone is not
enough: nested "PVM" flavours expose the node, accept `-accel kvm`, then abort on `-cpu host` or
never reach the guest's init. Such hosts advertise neither `vmx` nor `svm` in /proc/cpuinfo, which
is the cheap and reliable tell used here. Everything else falls back to TCG, with a warning that
the caller shows to the administrator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Accel = Literal["kvm", "tcg"]


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    cpu: str
    warning: str | None


def _cpu_flags(cpuinfo: Path) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_accel(
    requested: str = "auto",
    *,
    kvm_dev: Path = Path("/dev/kvm"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> AccelChoice:
    """Resolve ``auto``/``kvm``/``tcg`` into the accelerator and CPU model to use."""
    if requested not in ("auto", "kvm", "tcg"):
        raise ValueError(f"qemu.accel must be 'auto', 'kvm' or 'tcg', not {requested!r}")
    if requested == "tcg":
        return AccelChoice("tcg", "qemu64", None)
    usable = os.access(kvm_dev, os.R_OK | os.W_OK)
    hw = bool(_cpu_flags(cpuinfo) & {"vmx", "svm"})
    if usable and hw:
        return AccelChoice("kvm", "host", None)
    why = (
        f"{kvm_dev} is not accessible"
        if not usable
        else "the CPU advertises no vmx/svm (nested or paravirtual KVM cannot run stock guests)"
    )
    if requested == "kvm":
        raise ValueError(
            f"qemu.accel = 'kvm' but KVM is not usable here: {why}; use 'auto' or 'tcg'"
        )
    return AccelChoice(
        "tcg", "qemu64", f"KVM not usable ({why}): guests run under TCG emulation, much slower"
    )
