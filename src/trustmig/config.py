"""Host configuration (`host.toml`), validated by pydantic.

A host listens on one address and may advertise another (NAT, a dedicated migration network):
peers are told the *advertised* addresses, the sockets bind to the *listen* ones.
Relative paths are resolved against the directory holding the config file.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator


class ConfigError(Exception):
    """The configuration file is missing or invalid; the message names the key."""


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} must be HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


class Endpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    listen: str = "127.0.0.1:0"
    advertise: str | None = None

    @field_validator("listen", "advertise")
    @classmethod
    def _hp(cls, v: str | None) -> str | None:
        if v is not None:
            parse_hostport(v)
        return v


class PkiPaths(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cert: Path = Path("pki/host.pem")
    key: Path = Path("pki/host.key")
    ca: Path = Path("pki/ca.pem")
    crl: Path = Path("pki/crl.pem")


class QemuSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    binary: str = "qemu-system-x86_64"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    #: the address guests' forwarded ports (user networking) bind to on this host
    forward_address: str = "127.0.0.1"

    @field_validator("forward_address")
    @classmethod
    def _addr(cls, v: str) -> str:
        import ipaddress

        try:
            ipaddress.IPv4Address(v)
        except ValueError:
            raise ValueError(f"forward_address must be an IPv4 address, not {v!r}") from None
        return v


class Peer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    control: str
    labels: dict[str, str | int] = Field(default_factory=dict)
    #: the peer's data listener through a host-to-host IPsec tunnel (``migrate --transport
    #: ipsec``); the attested session then runs inside the tunnel
    tunnel_data: str | None = None
    #: the peer's VXLAN address for tenant networks (``[tenant_networks]``)
    underlay: str | None = None

    @field_validator("underlay")
    @classmethod
    def _underlay(cls, v: str | None) -> str | None:
        if v is not None:
            _ipv4(v, "peer underlay")
        return v

    @field_validator("control")
    @classmethod
    def _hp(cls, v: str) -> str:
        parse_hostport(v, "peer control address")
        return v

    @field_validator("tunnel_data")
    @classmethod
    def _tunnel(cls, v: str | None) -> str | None:
        if v is not None:
            parse_hostport(v, "peer tunnel_data address")
        return v


class AttestationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    tpm: Literal["auto", "device", "swtpm"] = "auto"
    refvalues: Path = Path("refvalues.json")
    registry: Path = Path("ak-registry.json")
    #: Enroll this host's own TPM into the registry at agent start when it is missing. Labs and
    #: demos only: in production the security admin enrolls each host, so a host cannot vouch for
    #: its own TPM.
    auto_enroll: bool = False


class CapacitySettings(BaseModel):
    """What this host can hold; measured at launch, so peers can check what it advertises.

    Unset values are read from the machine (``/proc/meminfo`` MemTotal, CPU count)."""

    model_config = ConfigDict(extra="forbid")
    mem_mib: int | None = Field(None, ge=64)
    vcpus: int | None = Field(None, ge=1)
    #: How old a destination's signed resource claim may be when the source checks it.
    max_claim_age_s: float = Field(30.0, gt=0)


class MigrationSettings(BaseModel):
    """How long each side waits for the other when an agent or a link goes away."""

    model_config = ConfigDict(extra="forbid")
    #: A pre-copy whose destination agent stays unreachable this long is rolled back.
    peer_grace_s: float = Field(60.0, gt=0)
    #: An incoming pre-copy whose source agent stays away this long is discarded.
    orphan_timeout_s: float = Field(300.0, gt=0)
    #: After this long without the destination's answer to a commit, the requester is told the
    #: migration is in doubt (the agent keeps resolving it).
    doubt_report_s: float = Field(120.0, gt=0)
    #: How long one commit call waits for the destination's answer.
    commit_timeout_s: float = Field(30.0, gt=0)
    #: A relay process whose streams ended waits this long for an agent before it exits.
    relay_linger_s: float = Field(600.0, gt=0)


class StoreSettings(BaseModel):
    """The cluster store (``[store]``): shared ownership records, quarantine, hosts' verdicts
    and loads. Off when ``url`` is empty; ``postgresql+psycopg://USER@HOST:PORT/DB`` for a
    cluster, ``sqlite:///PATH`` for a single host."""

    model_config = ConfigDict(extra="forbid")
    url: str = ""
    #: seconds between two rounds that make the store agree with this host
    interval_s: float = Field(5.0, gt=0, le=3600)


def _ipv4(value: str, what: str) -> str:
    import ipaddress

    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(
            f"{what} must be an IPv4 address such as 10.77.2.11, not {value!r}"
        ) from None
    return value


TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class TenantNetworkSettings(BaseModel):
    """Tenant-isolated guest networks (``[tenant_networks]``): one bridge per tenant on every
    host, joined across hosts by VXLAN over ``underlay`` (this host's address on a network no
    guest reaches, such as the migration network) to each peer's ``underlay``. ``vnis`` gives
    each tenant its segment and must be the same on every host. With ``tenants_only`` (the
    default) no NIC may join a shared bridge. Off when ``vnis`` is empty."""

    model_config = ConfigDict(extra="forbid")
    vnis: dict[str, int] = Field(default_factory=dict)
    underlay: str | None = None
    port: int = Field(4789, ge=1, le=65535)
    tenants_only: bool = True

    @field_validator("vnis")
    @classmethod
    def _vnis(cls, v: dict[str, int]) -> dict[str, int]:
        for tenant, vni in v.items():
            if not TENANT_NAME.match(tenant):
                raise ValueError(f"vnis: {tenant!r} is not a tenant name (a-z, 0-9, . _ -)")
            if not 1 <= vni <= 999_999:
                raise ValueError(f"vnis.{tenant}: {vni} is not a VNI in 1..999999")
        seen: dict[int, str] = {}
        for tenant, vni in v.items():
            if vni in seen:
                raise ValueError(f"vnis: tenants {seen[vni]} and {tenant} share VNI {vni}: "
                                 "each tenant needs its own segment")  # fmt: skip
            seen[vni] = tenant
        return v

    @field_validator("underlay")
    @classmethod
    def _underlay(cls, v: str | None) -> str | None:
        return _ipv4(v, "[tenant_networks] underlay") if v is not None else None


class MetricsSettings(BaseModel):
    """``/metrics`` in the Prometheus text format (``[metrics]``). Off when ``listen`` is empty.

    With ``tls`` (the default) the listener asks for a client certificate of the cluster's CA,
    checked against the CRL like the control port: give Prometheus a user certificate (any
    role; metrics name no VM or tenant). ``tls = false`` serves plain HTTP: bind it to a
    management address only."""

    model_config = ConfigDict(extra="forbid")
    listen: str = ""
    tls: bool = True

    @field_validator("listen")
    @classmethod
    def _hp(cls, v: str) -> str:
        if v:
            parse_hostport(v, "[metrics] listen")
        return v


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: What stopping the agent (SIGTERM) does to the guests: ``keep`` leaves them (and
    #: migrations in flight) running for the next agent to adopt; ``stop`` shuts them down.
    on_shutdown: Literal["keep", "stop"] = "keep"
    #: How often the agent tells its peers the length and head of its audit chain (they keep
    #: the longest, so a truncated trail shows; see docs/audit.md).
    audit_witness_interval_s: float = Field(30.0, gt=0)


def _dataclass_section(section: str, cls: type, value: Any) -> dict[str, Any]:
    """Check a ``[section]`` table against a dataclass of settings: known keys, right types."""
    if not isinstance(value, dict):
        raise ValueError(f"[{section}] must be a table of settings")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in known:
            raise ValueError(f"unknown key {key!r} under [{section}]; known: {', '.join(known)}")
    try:
        TypeAdapter(cls).validate_python(value)
        cls(**value)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"[{section}] {key}: {err['msg']}") from None
    except Exception as e:  # noqa: BLE001 - the settings' own checks (GuardError, AdmissionError)
        raise ValueError(f"[{section}]: {e}") from None
    return value


class HostConfig(BaseModel):
    """Everything one agent needs to run a host."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    state_dir: Path = Path(".")
    control: Endpoint = Field(default_factory=Endpoint)
    data: Endpoint = Field(default_factory=Endpoint)
    pki: PkiPaths = Field(default_factory=PkiPaths)
    qemu: QemuSettings = Field(default_factory=QemuSettings)
    image_cache: Path | None = None
    peers: dict[str, Peer] = Field(default_factory=dict)
    labels: dict[str, str | int] = Field(default_factory=dict)
    attestation: AttestationSettings = Field(default_factory=AttestationSettings)
    policy_dir: Path = Path("policies")
    guard: dict[str, Any] = Field(default_factory=dict, description="trustmig.guard.GuardRules")
    admission: dict[str, Any] = Field(
        default_factory=dict, description="trustmig.guard.AdmissionLimits"
    )
    host_policy: Path | None = None
    capacity: CapacitySettings = Field(default_factory=CapacitySettings)
    migration: MigrationSettings = Field(default_factory=MigrationSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tenant_networks: TenantNetworkSettings = Field(default_factory=TenantNetworkSettings)

    @field_validator("guard", mode="before")
    @classmethod
    def _guard(cls, value: Any) -> dict[str, Any]:
        from trustmig.guard import GuardRules

        return _dataclass_section("guard", GuardRules, value)

    @field_validator("admission", mode="before")
    @classmethod
    def _admission(cls, value: Any) -> dict[str, Any]:
        from trustmig.guard import AdmissionLimits

        return _dataclass_section("admission", AdmissionLimits, value)

    def resolve(self, base: Path) -> HostConfig:
        """Make every relative path absolute against ``base`` (the config file's directory)."""
        sd = self.state_dir if self.state_dir.is_absolute() else (base / self.state_dir)
        sd = sd.resolve()

        def r(p: Path) -> Path:
            return p if p.is_absolute() else sd / p

        return self.model_copy(
            update={
                "state_dir": sd,
                "pki": PkiPaths(
                    cert=r(self.pki.cert),
                    key=r(self.pki.key),
                    ca=r(self.pki.ca),
                    crl=r(self.pki.crl),
                ),
                "image_cache": r(self.image_cache) if self.image_cache else None,
                "attestation": self.attestation.model_copy(
                    update={
                        "refvalues": r(self.attestation.refvalues),
                        "registry": r(self.attestation.registry),
                    }
                ),
                "policy_dir": r(self.policy_dir),
                "host_policy": r(self.host_policy) if self.host_policy else None,
            }
        )

    def trust_relevant(self) -> dict[str, Any]:
        """The settings a peer's trust in this host rests on, as measured into PCR 12.

        Identity, keys, attestation, who its peers are and what it claims about itself (labels)
        and the QEMU it runs; and the guard's allow lists. Ports, addresses, limits, timeouts
        and the shutdown mode are left out on purpose: changing them is a plain edit and a
        restart, not a new reference value and a reseal (docs/attestation.md).
        """
        guard = self.guard or {}
        return {
            "name": self.name,
            "pki": self.pki.model_dump(mode="json"),
            "attestation": self.attestation.model_dump(mode="json"),
            "labels": self.labels,
            "peers": {n: {"labels": p.labels} for n, p in sorted(self.peers.items())},
            "qemu": {"binary": self.qemu.binary},
            "policy_dir": str(self.policy_dir),
            "host_policy": str(self.host_policy) if self.host_policy else None,
            "guard": {k: guard[k] for k in ("allowed_networks", "allowed_identities",
                                            "listener_networks") if k in guard},
        }  # fmt: skip

    @property
    def control_advertise(self) -> str:
        return self.control.advertise or self.control.listen

    @property
    def data_advertise(self) -> str:
        return self.data.advertise or self.data.listen


def load_config(path: Path) -> HostConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such config file (create one with 'trustmig host init')"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    try:
        cfg = HostConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{path}: {loc}: {msg}") from None
    return cfg.resolve(path.parent.resolve())
