"""Migration controls: QEMU capabilities and parameters, set explicitly on both ends.

QEMU keeps capabilities and parameters on the process, and some must match on both ends
(``postcopy-ram``, ``multifd``), so every migration sets all of them on both QEMUs instead of
relying on defaults. QEMU 7.2's default ``max-bandwidth`` is 128 MiB/s, which silently caps every
figure; it is always set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trustmig.hypervisor.qemu import QemuVM

UNLIMITED_BPS = 100 * 1024**3


class MigrationOptions(BaseModel):
    """What the user asked for; validated once, shared by both hosts."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["precopy", "postcopy"] = "precopy"
    postcopy_after_rounds: int = Field(
        2, ge=1, le=100, description="switch to post-copy after this many dirty-sync rounds"
    )
    postcopy_if_not_converging: bool = True
    auto_converge: bool = True
    multifd: int = Field(0, ge=0, le=16, description="multifd channels (0 = off)")
    #: post-copy: QEMU sends the pages the destination faults on over a channel of their own
    #: (QEMU 7.2's ``postcopy-preempt``), so they never queue behind bulk pages
    postcopy_preempt: bool = True
    downtime_ms: int = Field(300, ge=1, le=60000)
    max_bandwidth_mibps: int | None = Field(None, ge=1, description="None = unlimited")
    timeout_s: float = Field(600, gt=0)
    stall_timeout_s: float = Field(30, gt=0)
    prealloc_destination: bool = False
    #: ``secure``: trustmig's channel carries QEMU's stream (default). ``qemu-tls``: QEMU
    #: encrypts itself with TLS and the cluster's host certificates, peer pinned by name; the
    #: trustmig handshake (identities + attestation) still runs before QEMU connects.
    channel: Literal["secure", "qemu-tls"] = "secure"
    #: ``ipsec``: the data connections go to the peer's address inside the hosts' IPsec tunnel
    #: (``[peers.NAME] tunnel_data``), so the channel runs inside ESP (the paper's §8 proposal)
    transport: Literal["direct", "ipsec"] = "direct"

    @model_validator(mode="after")
    def _compatible(self) -> MigrationOptions:
        if self.mode == "postcopy" and self.multifd:
            raise ValueError(
                "post-copy and multifd cannot be combined in QEMU 7.2: drop --multifd or --postcopy"
            )
        return self

    @property
    def preempt(self) -> bool:
        """Whether QEMU opens the post-copy preempt channel: post-copy mode only, and not with
        QEMU's own TLS (7.2 tells its channels apart by arrival order, and two TLS handshakes
        may finish in either order; trustmig's relay connects the main stream first)."""
        return self.mode == "postcopy" and self.postcopy_preempt and self.channel != "qemu-tls"

    @property
    def streams(self) -> int:
        """Number of data streams QEMU opens, in its order of connecting: the main one, then
        each multifd channel or the post-copy preempt channel."""
        return 1 + self.multifd + int(self.preempt)

    @property
    def recovery_streams(self) -> int:
        """Streams of a recovered post-copy: the main one and the preempt channel (the disks
        were in sync before the switch, and multifd is never combined with post-copy)."""
        return 1 + int(self.preempt)

    @property
    def latency_streams(self) -> tuple[int, ...]:
        """The streams the destination guest waits on after the post-copy switch: the main
        one (the device state at the switch, then every page when there is no preempt
        channel) and the preempt channel (the pages it faults on)."""
        return (0, 1) if self.preempt else (0,)


def _caps(opts: MigrationOptions, *, source: bool) -> list[dict[str, Any]]:
    caps = {
        "postcopy-ram": opts.mode == "postcopy",
        "postcopy-preempt": opts.preempt,
        "multifd": opts.multifd > 0,
        "events": True,
        "auto-converge": source and opts.auto_converge,
    }
    return [{"capability": k, "state": v} for k, v in caps.items()]


async def configure_source(vm: QemuVM, opts: MigrationOptions) -> None:
    await vm.cmd("migrate-set-capabilities", {"capabilities": _caps(opts, source=True)})
    params: dict[str, Any] = {
        "max-bandwidth": (
            opts.max_bandwidth_mibps * 1024 * 1024 if opts.max_bandwidth_mibps else UNLIMITED_BPS
        ),
        "downtime-limit": opts.downtime_ms,
        "tls-creds": "",
    }
    if opts.multifd:
        params["multifd-channels"] = opts.multifd
    await vm.cmd("migrate-set-parameters", params)


async def configure_destination(vm: QemuVM, opts: MigrationOptions) -> None:
    await vm.cmd("migrate-set-capabilities", {"capabilities": _caps(opts, source=False)})
    params: dict[str, Any] = {"tls-creds": ""}
    if opts.multifd:
        params["multifd-channels"] = opts.multifd
    await vm.cmd("migrate-set-parameters", params)


@dataclass(frozen=True)
class MigrationProgress:
    """A `query-migrate` answer reduced to what operators watch."""

    status: str
    transferred: int
    remaining: int
    total: int
    dirty_rate_pps: int
    rounds: int
    expected_downtime_ms: int | None
    mbps: float
    total_ms: int | None
    downtime_ms: int | None
    setup_ms: int | None
    postcopy_requests: int
    error: str | None

    @classmethod
    def from_qmp(cls, info: dict[str, Any]) -> MigrationProgress:
        ram = info.get("ram", {})
        return cls(
            status=str(info.get("status", "none")),
            transferred=int(ram.get("transferred", 0)),
            remaining=int(ram.get("remaining", 0)),
            total=int(ram.get("total", 0)),
            dirty_rate_pps=int(ram.get("dirty-pages-rate", 0)),
            rounds=int(ram.get("dirty-sync-count", 0)),
            expected_downtime_ms=info.get("expected-downtime"),
            mbps=float(ram.get("mbps", 0.0)),
            total_ms=info.get("total-time"),
            downtime_ms=info.get("downtime"),
            setup_ms=info.get("setup-time"),
            postcopy_requests=int(ram.get("postcopy-requests", 0)),
            error=info.get("error-desc"),
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def query(vm: QemuVM) -> MigrationProgress:
    return MigrationProgress.from_qmp(await vm.cmd("query-migrate", timeout=10))
