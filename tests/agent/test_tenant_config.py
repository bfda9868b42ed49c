"""[tenant_networks] and the tenant NIC backend: bad input gets one clear line."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trustmig.config import TenantNetworkSettings
from trustmig.hypervisor.devices import HostNet, host_problems, tenant_tap
from trustmig.hypervisor.spec import VMSpec


def test_each_tenant_needs_its_own_segment() -> None:
    with pytest.raises(ValidationError, match="share VNI 7"):
        TenantNetworkSettings(vnis={"acme": 7, "evil": 7})
    with pytest.raises(ValidationError, match="not a VNI"):
        TenantNetworkSettings(vnis={"acme": 0})
    with pytest.raises(ValidationError, match="IPv4 address"):
        TenantNetworkSettings(vnis={"acme": 7}, underlay="host-b")


def _spec(backend: dict[str, str], tenant: str = "acme") -> VMSpec:
    return VMSpec.model_validate({
        "name": "vm1", "tenant": tenant,
        "nics": [{"id": "n0", "mac": "52:54:00:00:00:01", "backend": backend}],
        "workload": {"addresses": {"n0": "10.0.0.1/24"}},
    })  # fmt: skip


def test_a_host_that_keeps_tenants_apart_refuses_shared_bridges_and_unknown_tenants() -> None:
    net = HostNet(tenant_vnis=(("acme", 101),), tenants_only=True)
    shared = host_problems(_spec({"kind": "bridge", "bridge": "lo"}), net, incoming=False)
    assert any("shared bridge lo" in p for p in shared)
    unknown = host_problems(_spec({"kind": "tenant"}, tenant="evil"), net, incoming=False)
    assert any("tenant evil has no network segment" in p for p in unknown)
    assert tenant_tap(101, "/run/x", "n0").startswith("tv101_")
    assert len(tenant_tap(999_999, "/run/x", "n0")) == 15


def test_guest_addresses_are_checked() -> None:
    with pytest.raises(ValidationError, match="not an IPv4 address/prefix"):
        VMSpec.model_validate({"name": "vm1", "workload": {"addresses": {"n0": "ten"}}})
    with pytest.raises(ValidationError, match="no NIC with id n0"):
        VMSpec.model_validate({"name": "vm1", "workload": {"addresses": {"n0": "10.0.0.1/24"}}})
    line = _spec({"kind": "tenant"}).kernel_cmdline()
    assert "tm.net=52:54:00:00:00:01,10.0.0.1/24" in line
