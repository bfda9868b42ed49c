"""Validated policy documents: the VM policy that travels with a VM and each host's own policy.

Models are strict, frozen and reject unknown keys: a typo such as ``max_per_houre`` must fail
loudly instead of silently dropping a limit. Field validators phrase their errors as what the
field expects, because those messages end up in front of an administrator with a line number.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from trustmig.policy.identity import MIGRATING_ROLES, ROLE_AUDITOR
from trustmig.policy.windows import TimeWindow, parse_window

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_COUNTRY_RE = re.compile(r"^[A-Z]{2}$")
ANY_HOST = "*"

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"expected {what} (letters, digits, '.', '_', '@', '-'; at most 128), got {value!r}"
        )
    return value


def _check_name_list(value: Any, what: str, *, allow_any: bool = False) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of {what}, got {type(value).__name__} {value!r}")
    out: list[str] = []
    for item in value:
        if allow_any and item == ANY_HOST:
            out.append(item)
            continue
        out.append(_check_name(item, what.rstrip("s")))
    if len(set(out)) != len(out):
        raise ValueError(f"expected a list of {what} without duplicates, got {value!r}")
    return out


def _check_countries(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(
        isinstance(c, str) and _COUNTRY_RE.match(c) for c in value
    ):
        raise ValueError(
            f'expected a list of ISO 3166 two-letter country codes such as ["DE", "FR"], '
            f"got {value!r}"
        )
    return list(value)


class MigrateRules(BaseModel):
    """Who may migrate the VM, how, when and how often."""

    model_config = _STRICT

    allowed_users: list[str] = Field(default_factory=list)
    allowed_roles: list[str] = Field(default_factory=list)
    postcopy: bool = False
    max_per_hour: int | None = Field(default=None, ge=1)
    windows: list[str] = Field(default_factory=list)

    @field_validator("allowed_users", mode="before")
    @classmethod
    def _users(cls, value: Any) -> list[str]:
        return _check_name_list(value, "user names")

    @field_validator("allowed_roles", mode="before")
    @classmethod
    def _roles(cls, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
            raise ValueError(f"expected a list of role names, got {value!r}")
        for role in value:
            if role == ROLE_AUDITOR:
                raise ValueError("auditors may never migrate; remove 'auditor' from the list")
            if role not in MIGRATING_ROLES:
                raise ValueError(
                    f"unknown role {role!r}; use one of {', '.join(sorted(MIGRATING_ROLES))}"
                )
        return list(value)

    @field_validator("windows", mode="before")
    @classmethod
    def _windows(cls, value: Any) -> list[str]:
        if not isinstance(value, list):
            raise ValueError(
                f'expected a list of windows such as ["Mon-Fri 22:00-06:00 UTC"], got {value!r}'
            )
        for item in value:
            parse_window(item)
        return list(value)

    def parsed_windows(self) -> tuple[TimeWindow, ...]:
        """The windows as objects (already validated, so this cannot fail)."""
        return tuple(parse_window(w) for w in self.windows)


class DestinationRules(BaseModel):
    """Where the VM may go. Empty lists mean "no restriction from this rule"."""

    model_config = _STRICT

    hosts: list[str] = Field(default_factory=list)
    countries: list[str] = Field(default_factory=list)
    zones: list[str] = Field(default_factory=list)
    min_security_level: int = Field(default=0, ge=0)

    @field_validator("hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> list[str]:
        return _check_name_list(value, "host names")

    @field_validator("countries", mode="before")
    @classmethod
    def _countries(cls, value: Any) -> list[str]:
        return _check_countries(value)

    @field_validator("zones", mode="before")
    @classmethod
    def _zones(cls, value: Any) -> list[str]:
        return _check_name_list(value, "zone names")


class CoResidencyRules(BaseModel):
    """Whom the VM may share a host with (the paper's co-residency and inter-VM attacks).

    ``neighbours``: ``any`` (the default), ``tenant`` (only VMs of its own tenant) or ``none``
    (a host of its own). ``never_with_tenants``: tenants it must never share a host with. A
    host decides these from what really runs there, and every resident's rules count too."""

    model_config = _STRICT

    neighbours: Literal["any", "tenant", "none"] = "any"
    never_with_tenants: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("never_with_tenants", mode="before")
    @classmethod
    def _tenants(cls, value: Any) -> list[str]:
        return _check_name_list(value, "tenant names")


class AttestationRules(BaseModel):
    """How strictly the destination must be attested before it receives the VM."""

    model_config = _STRICT

    profile: Literal["strict", "none"] = "strict"


class VmPolicy(BaseModel):
    """The policy provisioned with a VM and signed by its owner or a security-admin."""

    model_config = _STRICT

    vm: str
    tenant: str
    owner: str
    #: Version of this VM's policy: a host accepts only a serial above the one it holds.
    serial: int = Field(ge=1, le=2**53)
    #: When the policy starts and stops being valid (timezone-aware; open-ended when omitted).
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    migrate: MigrateRules = Field(default_factory=MigrateRules)
    destinations: DestinationRules = Field(default_factory=DestinationRules)
    attestation: AttestationRules = Field(default_factory=AttestationRules)
    co_residency: CoResidencyRules = Field(default_factory=CoResidencyRules)

    _signed_by: str | None = PrivateAttr(default=None)

    @field_validator("vm", "tenant", "owner", mode="before")
    @classmethod
    def _names(cls, value: Any) -> str:
        return _check_name(value, "a name")

    @field_validator("valid_from", "valid_until", mode="before")
    @classmethod
    def _instant(cls, value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                value = None
        if not isinstance(value, datetime):
            raise ValueError(
                "expected a date and time with its offset such as 2027-01-31T00:00:00Z"
            )
        if value.utcoffset() is None:
            raise ValueError(
                f"expected a timezone offset (e.g. {value.isoformat()}Z), got a local time"
            )
        return value

    @model_validator(mode="after")
    def _period(self) -> VmPolicy:
        if self.valid_from and self.valid_until and self.valid_until <= self.valid_from:
            raise ValueError("valid_until must come after valid_from")
        return self

    def validity_problem(self, now: datetime) -> str | None:
        """Why the policy is not valid at ``now``, or None when it is."""
        if self.valid_from is not None and now < self.valid_from:
            return f"serial {self.serial} is valid only from {self.valid_from.isoformat()}"
        if self.valid_until is not None and now >= self.valid_until:
            return f"serial {self.serial} expired on {self.valid_until.isoformat()}"
        return None

    @property
    def signed_by(self) -> str | None:
        """Name of the verified signer, or None when the policy was loaded unsigned."""
        return self._signed_by

    def with_signer(self, signer: str) -> VmPolicy:
        """A copy marked as verified for ``signer``; only the signature verifier calls this."""
        copy = self.model_copy()
        copy._signed_by = signer
        return copy


class HostLabels(BaseModel):
    """Facts about a host that VM policies select on (jurisdiction, zone, hardening level)."""

    model_config = _STRICT

    country: str
    zone: str | None = None
    security_level: int = Field(default=0, ge=0)

    @field_validator("country", mode="before")
    @classmethod
    def _country(cls, value: Any) -> str:
        if not isinstance(value, str) or not _COUNTRY_RE.match(value):
            raise ValueError(
                f'expected an ISO 3166 two-letter country code such as "DE", got {value!r}'
            )
        return value

    @field_validator("zone", mode="before")
    @classmethod
    def _zone(cls, value: Any) -> str | None:
        return None if value is None else _check_name(value, "a zone name")


class AcceptRules(BaseModel):
    """What a destination host accepts. Empty lists accept nothing (default deny)."""

    model_config = _STRICT

    sources: list[str] = Field(default_factory=list)
    tenants: list[str] = Field(default_factory=list)
    require_signed_vm_policy: bool = True

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> list[str]:
        return _check_name_list(value, "host names", allow_any=True)

    @field_validator("tenants", mode="before")
    @classmethod
    def _tenants(cls, value: Any) -> list[str]:
        return _check_name_list(value, "tenant names")


class HostPolicy(BaseModel):
    """A destination host's own rules and labels."""

    model_config = _STRICT

    host: str
    labels: HostLabels
    accept: AcceptRules = Field(default_factory=AcceptRules)

    @field_validator("host", mode="before")
    @classmethod
    def _host(cls, value: Any) -> str:
        return _check_name(value, "a host name")


__all__ = [
    "ANY_HOST",
    "AcceptRules",
    "AttestationRules",
    "DestinationRules",
    "HostLabels",
    "HostPolicy",
    "MigrateRules",
    "VmPolicy",
]
