"""What a migration benchmark measures: channels, guest size, dirtying rates, repetitions.

Options are parsed and checked once, before any VM boots, so that a typo fails in milliseconds
instead of after minutes of booting guests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from trustmig.bench.errors import BenchConfigError

Channel = Literal["plain", "secure", "qemu-tls", "ipsec", "secure+ipsec"]
CHANNELS: tuple[Channel, ...] = ("plain", "secure", "qemu-tls", "ipsec", "secure+ipsec")
#: the default set, which needs no tunnel (the IPsec ones need --netns)
DEFAULT_CHANNELS: tuple[Channel, ...] = ("plain", "secure", "qemu-tls")
#: channels that run through the hosts' IPsec tunnel
IPSEC_CHANNELS = ("ipsec", "secure+ipsec")
_KNOWN = "plain, secure, qemu-tls, ipsec, secure+ipsec"
#: Kernel, initramfs and the workload's own bookkeeping need this much guest RAM besides the fill.
GUEST_OVERHEAD_MIB = 48
#: Headroom left by the default fill (``memory - 160``) so the guest never runs short.
DEFAULT_FILL_HEADROOM_MIB = 160


def parse_channels(text: str | Sequence[str]) -> tuple[Channel, ...]:
    """``"plain,secure"`` -> ``("plain", "secure")``; unknown or repeated names are refused."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [i.strip() for i in items if i.strip()]
    if not names:
        raise BenchConfigError(f"--channel is empty: give one or more of {_KNOWN}")
    out: list[Channel] = []
    for n in names:
        if n not in CHANNELS:
            raise BenchConfigError(f"unknown channel {n!r} in --channel: use {_KNOWN}")
        if n in out:
            raise BenchConfigError(f"channel {n!r} given twice in --channel: list it once")
        out.append(n)
    return tuple(out)


def parse_dirty_rates(text: str | Sequence[float]) -> tuple[float, ...]:
    """``"0,64"`` -> ``(0.0, 64.0)`` MiB/s; negative, repeated or non-numeric values are refused."""
    items = text.split(",") if isinstance(text, str) else [str(x) for x in text]
    rates: list[float] = []
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        try:
            r = float(raw)
        except ValueError:
            raise BenchConfigError(
                f"--dirty-rate value {raw!r} is not a number: give MiB/s values like 0,64"
            ) from None
        if not 0 <= r <= 100000:
            raise BenchConfigError(f"--dirty-rate {raw} is out of range: use 0..100000 MiB/s")
        if r in rates:
            raise BenchConfigError(f"--dirty-rate {raw} given twice: list each rate once")
        rates.append(r)
    if not rates:
        raise BenchConfigError("--dirty-rate is empty: give one or more MiB/s values like 0,64")
    return tuple(rates)


def rate_key(rate: float) -> str:
    """The JSON key of a dirty rate: ``64.0`` -> ``"64"``, ``0.5`` -> ``"0.5"``."""
    return f"{rate:g}"


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark: every channel migrates the same guest configuration the same way.

    ``prealloc_destination`` is on by default for every channel: on this kind of host a fresh
    destination is several times slower the first time it touches guest RAM, and that cost belongs
    to the host, not to the channel under test. Pre-allocating makes the transfer rate compare
    channels; its start-up cost is paid before the migration starts (it shows in the secure
    channel's time to first byte, which includes preparing the destination).
    """

    channels: tuple[Channel, ...] = DEFAULT_CHANNELS
    memory_mib: int = 1024
    fill_mib: int | None = None
    dirty_rates: tuple[float, ...] = (0.0,)
    repeat: int = 3
    postcopy: bool = False
    postcopy_preempt: bool = True
    prealloc_destination: bool = True
    postcopy_after_rounds: int = 1
    timeout_s: float = 600.0
    vm_name: str = "bench-vm"
    #: hosts in network namespaces, migrating over their own migration network
    netns: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.channels:
            raise BenchConfigError(f"no channel selected: give one or more of {_KNOWN}")
        for c in self.channels:
            if c not in CHANNELS:
                raise BenchConfigError(f"unknown channel {c!r}: use {_KNOWN}")
            if c in IPSEC_CHANNELS and not self.netns:
                raise BenchConfigError(f"channel {c} runs between namespaced hosts: add --netns")
        if not 128 <= self.memory_mib <= 65536:
            raise BenchConfigError(
                f"--memory {self.memory_mib} MiB is out of range: use 128..65536 MiB"
            )
        fill = self.fill
        if fill < 0:
            raise BenchConfigError(f"--fill {fill} MiB is negative: use 0 or more MiB")
        if fill + GUEST_OVERHEAD_MIB > self.memory_mib:
            raise BenchConfigError(
                f"--fill {fill} MiB does not fit a {self.memory_mib} MiB guest: use at most "
                f"{self.memory_mib - GUEST_OVERHEAD_MIB} MiB or raise --memory"
            )
        if not 1 <= self.repeat <= 100:
            raise BenchConfigError(f"--repeat {self.repeat} is out of range: use 1..100")
        if not self.dirty_rates:
            raise BenchConfigError("no dirty rate given: use --dirty-rate 0 or a list like 0,64")

    @property
    def fill(self) -> int:
        """MiB of patterned memory the workload writes (default: memory minus 160 MiB)."""
        if self.fill_mib is not None:
            return self.fill_mib
        return max(0, self.memory_mib - DEFAULT_FILL_HEADROOM_MIB)

    @property
    def modes(self) -> tuple[str, ...]:
        return ("precopy", "postcopy") if self.postcopy else ("precopy",)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["dirty_rates"] = list(self.dirty_rates)
        d["fill_mib"] = self.fill
        d.pop("extra")
        return {**d, **self.extra}
