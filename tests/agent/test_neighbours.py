"""The host's co-residency bookkeeping: reservations by name, arriving VMs judged by the policy
they bring (pure logic over a stand-in VM table)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from trustmig.agent.errors import RequestError
from trustmig.agent.neighbours import Neighbours
from trustmig.policy import VmPolicy


def _policy(vm: str, tenant: str, neighbours: str) -> VmPolicy:
    return VmPolicy.model_validate({"vm": vm, "tenant": tenant, "owner": "o", "serial": 1,
                                    "co_residency": {"neighbours": neighbours}})  # fmt: skip


def _host(**vms: Any) -> tuple[Neighbours, list[dict[str, Any]]]:
    audited: list[dict[str, Any]] = []
    table = SimpleNamespace(vms=vms)
    n = Neighbours("h", table, lambda vm: None, lambda kind, **f: audited.append(f))  # type: ignore[arg-type]
    return n, audited


def _vm(tenant: str, state: str = "running") -> Any:
    return SimpleNamespace(spec=SimpleNamespace(tenant=tenant), state=state, name="")


def _enter(n: Neighbours, vm: str, tenant: str) -> None:
    with n.reserve(vm, tenant, None, user="someone"):
        pass


def test_a_name_already_reserved_or_held_cannot_be_reserved_again() -> None:
    n, _ = _host(held=_vm("acme"))
    with n.reserve("victim", "acme", _policy("victim", "acme", "tenant"), user="alice"):
        with pytest.raises(RequestError, match="already starting"):
            _enter(n, "victim", "evil")
        # the first reservation still counts for a third newcomer
        with pytest.raises(RequestError, match=r"co_residency\.resident_neighbours"):
            _enter(n, "spy", "evil")
    with pytest.raises(RequestError, match="already starting"):
        _enter(n, "held", "evil")


def test_an_arriving_vm_counts_with_the_policy_it_brought() -> None:
    n, audited = _host()
    strict = _policy("a1", "acme", "tenant")
    with n.reserve("a1", "acme", strict, user="alice"):
        pass
    arriving: Any = SimpleNamespace(
        spec=SimpleNamespace(tenant="acme"), state="incoming", name="a1"
    )
    n.vms.vms["a1"] = arriving
    d = n.decide("spy", "evil", None)
    assert not d.allow and "a1" not in d.reason
    with pytest.raises(RequestError):
        n.require("spy", "evil", None, user="eve")
    assert audited[-1]["data"]["direction"] == "co-residency"
