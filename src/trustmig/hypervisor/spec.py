"""`VMSpec`: the one description both hosts use to start identical machines.

Live migration only works when source and destination QEMU have the same device model and memory
size, so the spec travels with the migration request and the destination starts its incoming QEMU
from it rather than from local guesses.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DEFAULT_SECRET = "TRUSTMIG-SECRET-MARKER-7f3a9c"


class WorkloadSpec(BaseModel):
    """Settings of the in-guest workload (heartbeat, patterned memory, secret marker)."""

    model_config = ConfigDict(extra="forbid")

    mem_mib: int = Field(64, ge=0, le=65536, description="MiB of patterned guest memory")
    dirty_rate: float = Field(0.0, ge=0, le=100000, description="MiB/s rewritten")
    hb_ms: int = Field(10, ge=1, le=10000, description="heartbeat period")
    secret: str = Field(DEFAULT_SECRET, min_length=8, max_length=200)
    marker_pages: int = Field(64, ge=1, le=4096)

    def kernel_args(self) -> list[str]:
        return [
            f"tm.mem_mib={self.mem_mib}",
            f"tm.dirty_rate={self.dirty_rate:g}",
            f"tm.hb_ms={self.hb_ms}",
            f"tm.secret_hex={self.secret.encode().hex()}",
            f"tm.marker_pages={self.marker_pages}",
        ]


class VMSpec(BaseModel):
    """A VM as both hosts must start it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    memory_mib: int = Field(512, ge=64, le=1024 * 1024)
    vcpus: int = Field(1, ge=1, le=256)
    image_key: str | None = Field(None, description="guest image digest both hosts must hold")
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    tenant: str = "default"
    owner: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(
                "VM name must be 1-63 chars of lowercase letters, digits, '.', '_' or '-'"
            )
        return v

    def kernel_cmdline(self) -> str:
        return " ".join(
            ["console=ttyS0", "quiet", "loglevel=1", "panic=-1", *self.workload.kernel_args()]
        )

    def check_fits(self) -> None:
        """Refuse a workload that cannot fit the guest's RAM (kernel + initramfs need ~48 MiB)."""
        need = self.workload.mem_mib + 48 + self.workload.marker_pages * 4 // 1024
        if need > self.memory_mib:
            raise ValueError(
                f"workload needs about {need} MiB but the VM has {self.memory_mib} MiB: "
                "raise memory_mib or lower workload.mem_mib"
            )
