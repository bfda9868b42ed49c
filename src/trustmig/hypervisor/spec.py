"""`VMSpec`: a VM definition, the one description both hosts use to start identical machines.

Live migration only works when source and destination QEMU have the same device model and memory
size, so the definition travels with the migration request and the destination starts its
incoming QEMU from it rather than from local guesses. A definition names the machine (type, CPU
model, memory, vCPUs), how it boots (trustmig's own lab guest, a kernel with initrd and command
line, or firmware from a disk), its disks and NICs, and optionally the in-guest workload that
reports heartbeats and memory checks on the serial console.

What the guest sees (devices, MACs, disk serials) is the definition; what the host provides
behind it (the address forwarded ports bind to, a tap's name) is the host's business and is
decided where QEMU starts.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DEVICE_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,15}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
BRIDGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
MACHINE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,40}$")
CPU_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,=+-]{0,80}$")
DEFAULT_SECRET = "TRUSTMIG-SECRET-MARKER-7f3a9c"
#: MiB a booted lab guest needs besides its workload (kernel and initramfs)
LAB_BASE_MIB = 48


class DefinitionError(ValueError):
    """A VM definition is invalid; the message is one line naming the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkloadSpec(_Strict):
    """Settings of the in-guest workload (heartbeat, patterned memory, secret marker)."""

    mem_mib: int = Field(64, ge=0, le=65536, description="MiB of patterned guest memory")
    dirty_rate: float = Field(0.0, ge=0, le=100000, description="MiB/s rewritten")
    hb_ms: int = Field(10, ge=1, le=10000, description="heartbeat period")
    secret: str = Field(DEFAULT_SECRET, min_length=8, max_length=200)
    marker_pages: int = Field(64, ge=1, le=4096)
    #: a TCP port on which the guest hands out its secret (the lab's victim service)
    serve_port: int | None = Field(None, ge=1, le=65535)
    #: static IPv4 addresses of the lab guest's NICs, by NIC id (``"10.77.3.101/24"``)
    addresses: dict[str, str] = Field(default_factory=dict, max_length=8)

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: dict[str, str]) -> dict[str, str]:
        for nic, cidr in v.items():
            try:
                ipaddress.IPv4Interface(cidr)
            except ValueError:
                raise ValueError(f"addresses.{nic}: {cidr!r} is not an IPv4 address/prefix "
                                 "such as 10.77.3.101/24") from None  # fmt: skip
            if "/" not in cidr:
                raise ValueError(f"addresses.{nic}: give the prefix too, as in {cidr}/24")
        return v

    def kernel_args(self) -> list[str]:
        args = [
            f"tm.mem_mib={self.mem_mib}",
            f"tm.dirty_rate={self.dirty_rate:g}",
            f"tm.hb_ms={self.hb_ms}",
            f"tm.secret_hex={self.secret.encode().hex()}",
            f"tm.marker_pages={self.marker_pages}",
        ]
        return [*args, f"tm.serve={self.serve_port}"] if self.serve_port else args


def _absolute(v: Path, what: str) -> Path:
    if not v.is_absolute():
        raise ValueError(f"{what} must be an absolute path, not {str(v)!r}")
    return v


def _no_quotes(v: str, what: str) -> str:
    if '"' in v or "\n" in v or "\x00" in v:
        raise ValueError(f"{what} must not contain quotes, newlines or NUL")
    return v


class LabBoot(_Strict):
    """trustmig's own guest: the cached kernel and busybox initramfs (fast, no disk needed)."""

    kind: Literal["lab"] = "lab"


class KernelBoot(_Strict):
    """A kernel (and initrd) on the host's file system with its command line; both hosts must
    hold byte-identical files, which the digests recorded at first start prove."""

    kind: Literal["kernel"] = "kernel"
    kernel: Path
    initrd: Path | None = None
    cmdline: str = Field("", max_length=2048)
    kernel_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    initrd_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("kernel", "initrd")
    @classmethod
    def _abs(cls, v: Path | None) -> Path | None:
        return None if v is None else _absolute(v, "a boot file")

    @field_validator("cmdline")
    @classmethod
    def _cmd(cls, v: str) -> str:
        return _no_quotes(v, "boot.cmdline")


class DiskBoot(_Strict):
    """Firmware boots the first disk (its boot loader decides the rest)."""

    kind: Literal["disk"] = "disk"


Boot = Annotated[LabBoot | KernelBoot | DiskBoot, Field(discriminator="kind")]


class DiskSpec(_Strict):
    """A block device of the guest and the image behind it."""

    id: str
    path: Path
    format: Literal["qcow2", "raw"] = "qcow2"
    bus: Literal["virtio-blk", "nvme"] = "virtio-blk"
    cache: Literal["none", "writeback", "writethrough", "directsync", "unsafe"] = "none"
    read_only: bool = False
    shared: bool = Field(False, description="the image lives on storage both hosts see")
    serial: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,20}$")
    identity: str | None = Field(
        None, pattern=r"^[0-9a-f]{32}$", description="the image's identity tag, set at start"
    )
    virtual_size: int | None = Field(
        None, ge=0, description="bytes the guest sees (recorded at start, for the copy)"
    )
    encrypt: Literal["luks"] | None = Field(
        None, description="encrypted at rest (QEMU LUKS) with a key trustmig makes and seals"
    )
    size_mib: int | None = Field(
        None, ge=1, le=16 * 1024 * 1024, description="size of an encrypted disk trustmig creates"
    )

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not DEVICE_ID_RE.match(v):
            raise ValueError("disk id must be 1-16 chars: a lowercase letter, then a-z 0-9 _ -")
        return v

    @field_validator("path")
    @classmethod
    def _abs(cls, v: Path) -> Path:
        return _absolute(v, "disk path")

    @model_validator(mode="after")
    def _size_for_encrypted(self) -> DiskSpec:
        if self.size_mib is not None and self.encrypt is None:
            raise ValueError('size_mib is only for encrypted disks (encrypt = "luks")')
        return self

    def drive_serial(self) -> str:
        return self.serial or f"tm-{self.id}"


class Forward(_Strict):
    """A host port forwarded into the guest by QEMU's user networking (labs and tests)."""

    proto: Literal["tcp", "udp"] = "tcp"
    host_port: int = Field(ge=1, le=65535)
    guest_port: int = Field(ge=1, le=65535)


class UserNet(_Strict):
    """QEMU's user-mode network: NAT, no root, ports forwarded on the host's forward address."""

    kind: Literal["user"] = "user"
    forwards: list[Forward] = Field(default_factory=list, max_length=32)


class BridgeNet(_Strict):
    """A tap device on a named host bridge (the bridge must exist on every host it runs on)."""

    kind: Literal["bridge"] = "bridge"
    bridge: str

    @field_validator("bridge")
    @classmethod
    def _br(cls, v: str) -> str:
        if not BRIDGE_RE.match(v):
            raise ValueError("bridge must be a network interface name (1-15 chars)")
        return v


class TenantNet(_Strict):
    """The NIC joins its tenant's own network segment: a bridge per tenant on every host,
    joined across hosts by VXLAN (``[tenant_networks]`` in the host config), which no guest of
    another tenant reaches."""

    kind: Literal["tenant"] = "tenant"


NetBackend = Annotated[UserNet | BridgeNet | TenantNet, Field(discriminator="kind")]

#: the most guest memory one measured region may span
MAX_MEASURED_BYTES = 256 * 1024 * 1024


class MeasuredRegion(_Strict):
    """Guest-physical memory that must arrive unchanged (e.g. the kernel's code): measured on
    the source once it stopped and on the destination before the guest runs there."""

    name: str
    gpa: int = Field(ge=0, description="guest-physical start address")
    size: int = Field(ge=4096, le=MAX_MEASURED_BYTES)

    @field_validator("name")
    @classmethod
    def _id(cls, v: str) -> str:
        if not DEVICE_ID_RE.match(v):
            raise ValueError("region name must be 1-16 chars: a lowercase letter, then a-z 0-9 _ -")
        return v


class NicSpec(_Strict):
    """A network card of the guest; its MAC travels with it."""

    id: str
    model: Literal["virtio-net-pci", "e1000", "rtl8139"] = "virtio-net-pci"
    mac: str
    backend: NetBackend = Field(default_factory=UserNet)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not DEVICE_ID_RE.match(v):
            raise ValueError("nic id must be 1-16 chars: a lowercase letter, then a-z 0-9 _ -")
        return v

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        v = v.lower()
        if not MAC_RE.match(v):
            raise ValueError("mac must be six hex pairs like 52:54:00:12:34:56")
        if int(v[:2], 16) & 1:
            raise ValueError("mac must be a unicast address (first byte even)")
        return v


class VMSpec(_Strict):
    """A VM as both hosts must start it."""

    name: str
    tenant: str = "default"
    owner: str | None = None
    machine: str = "pc"
    cpu: str | None = Field(None, description="QEMU CPU model; the host's default if unset")
    memory_mib: int = Field(512, ge=64, le=1024 * 1024)
    vcpus: int = Field(1, ge=1, le=256)
    boot: Boot = Field(default_factory=LabBoot)
    disks: list[DiskSpec] = Field(default_factory=list, max_length=16)
    nics: list[NicSpec] = Field(default_factory=list, max_length=8)
    workload: WorkloadSpec | None = None
    measure: list[MeasuredRegion] = Field(default_factory=list, max_length=8)
    image_key: str | None = Field(None, description="lab guest image digest both hosts hold")

    @model_validator(mode="before")
    @classmethod
    def _lab_has_workload(cls, data: Any) -> Any:
        """The lab guest always runs the workload; other guests only when [workload] says so."""
        if isinstance(data, dict) and "workload" not in data:
            boot = data.get("boot")
            kind = boot.get("kind") if isinstance(boot, dict) else getattr(boot, "kind", None)
            if kind in (None, "lab"):
                data = {**data, "workload": {}}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(
                "VM name must be 1-63 chars of lowercase letters, digits, '.', '_' or '-'"
            )
        return v

    @field_validator("machine")
    @classmethod
    def _machine(cls, v: str) -> str:
        if not MACHINE_RE.match(v):
            raise ValueError("machine must be a QEMU machine type such as pc, q35 or pc-q35-7.2")
        return v

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, v: str | None) -> str | None:
        if v is not None and not CPU_RE.match(v):
            raise ValueError("cpu must be a QEMU CPU model such as qemu64 or host")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> VMSpec:
        ids = [d.id for d in self.disks] + [n.id for n in self.nics]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"device ids must be unique: {', '.join(dup)} used twice")
        macs = [n.mac for n in self.nics]
        if len(set(macs)) != len(macs):
            raise ValueError("nics: two NICs have the same mac")
        for r in self.measure:
            if r.gpa + r.size > self.memory_mib * 1024 * 1024:
                raise ValueError(
                    f"measure: region {r.name} ends beyond the guest's {self.memory_mib} MiB"
                )
        unknown = sorted(set(self.workload.addresses) - {n.id for n in self.nics}
                         if self.workload else ())  # fmt: skip
        if unknown:
            raise ValueError(f"workload.addresses: no NIC with id {unknown[0]}")
        if self.boot.kind == "disk" and not self.disks:
            raise ValueError("boot.kind = 'disk' needs at least one disk")
        if self.boot.kind == "disk" and self.workload is not None:
            raise ValueError(
                "workload settings travel on the kernel command line: use boot.kind 'lab' or "
                "'kernel', or remove [workload]"
            )
        return self

    # ------------------------------------------------------------------ what QEMU is given
    def kernel_cmdline(self) -> str:
        """The command line for lab and kernel boots (the workload's settings included)."""
        workload = self.workload.kernel_args() if self.workload else []
        # measured regions are physical addresses: the kernel must not move itself at random
        fixed = ["nokaslr"] if self.measure else []
        if isinstance(self.boot, KernelBoot):
            args = self.boot.cmdline.split()
            return " ".join([*args, *(a for a in fixed if a not in args), *workload])
        macs = {n.id: n.mac for n in self.nics}
        nets = [f"tm.net={macs[i]},{a}" for i, a in (self.workload.addresses.items()
                                                       if self.workload else ())]  # fmt: skip
        return " ".join(["console=ttyS0", "quiet", "loglevel=1", "panic=-1", *fixed, *workload,
                         *nets])  # fmt: skip

    @property
    def needs_workload(self) -> WorkloadSpec:
        """The workload settings of a guest that must have one (lab and benchmark guests)."""
        if self.workload is None:
            raise DefinitionError(f"VM {self.name} runs no workload: add a [workload] section")
        return self.workload

    @property
    def waits_for_workload(self) -> bool:
        """A guest with the workload is ready when it says READY; others when QEMU runs."""
        return self.workload is not None

    def forwards(self) -> list[Forward]:
        return [f for n in self.nics if isinstance(n.backend, UserNet) for f in n.backend.forwards]

    def bridges(self) -> list[str]:
        return [n.backend.bridge for n in self.nics if isinstance(n.backend, BridgeNet)]

    def check_fits(self) -> None:
        """Refuse a lab workload that cannot fit the guest's RAM (kernel + initramfs ~48 MiB)."""
        if self.workload is None or self.boot.kind != "lab":
            return
        need = self.workload.mem_mib + LAB_BASE_MIB + self.workload.marker_pages * 4 // 1024
        if need > self.memory_mib:
            raise ValueError(
                f"workload needs about {need} MiB but the VM has {self.memory_mib} MiB: "
                "raise memory_mib or lower workload.mem_mib"
            )


_UNION_TAGS = frozenset({"lab", "kernel", "disk", "user", "bridge", "tenant"})


def _loc(err: ErrorDetails) -> str:
    loc = [str(p) for p in err.get("loc", ())]
    # a discriminated union puts the variant's tag right after the field: drop it
    parts = [
        p for i, p in enumerate(loc)
        if not (i and loc[i - 1] in ("boot", "backend") and p in _UNION_TAGS)
    ]  # fmt: skip
    return ".".join(parts) or "definition"


def definition_error_line(e: ValidationError) -> str:
    """One line naming the first wrong field and what it allows."""
    err = e.errors(include_url=False)[0]
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field (check its spelling against docs/vms.md)"
    elif err.get("type") == "missing":
        msg = "missing (required)"
    return f"{_loc(err)}: {msg}"


def parse_definition(data: dict[str, Any]) -> VMSpec:
    """Validate a definition; raises DefinitionError with one line naming the field."""
    try:
        spec = VMSpec.model_validate(data)
        spec.check_fits()
    except ValidationError as e:
        raise DefinitionError(definition_error_line(e)) from None
    except ValueError as e:
        raise DefinitionError(str(e)) from None
    return spec


def read_definition(path: Path) -> tuple[dict[str, Any], VMSpec]:
    """A definition file's fields as written and as validated (the agent validates the former
    again); raises DefinitionError naming the file and the field."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise DefinitionError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise DefinitionError(f"{path}: not valid TOML ({e})") from None
    try:
        return data, parse_definition(data)
    except DefinitionError as e:
        raise DefinitionError(f"{path}: {e}") from None


def load_definition(path: Path) -> VMSpec:
    """Read and validate a definition file (TOML); raises DefinitionError."""
    return read_definition(path)[1]
