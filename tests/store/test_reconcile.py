"""What an agent writes to make the store agree with what it runs (pure), and its rounds
against a real store: catch-up after an outage, conflicts reported, quarantine cluster-wide."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from trustmig.agent.cluster_sync import CLUSTER_PREFIX, ClusterSync
from trustmig.guard.claims import Quarantine
from trustmig.store import ClusterStore, VmRecord
from trustmig.store.reconcile import Conflict, HandOver, HeldVm, Place, Release, reconcile

WEB = HeldVm("web", "acme", 3, 512, 2)
NONE: frozenset[str] = frozenset()


def rec(owner: str, epoch: int, name: str = "web") -> VmRecord:
    return VmRecord(name, "acme", owner, epoch, 512, 2)


def test_an_unknown_vm_is_placed_and_a_known_one_left_alone() -> None:
    assert reconcile("host-a", [WEB], {}, NONE) == [Place(WEB)]
    assert reconcile("host-a", [WEB], {"web": rec("host-a", 3)}, NONE) == []
    assert reconcile("host-a", [WEB], {"web": rec("host-a", 2)}, NONE) == [Place(WEB)]


def test_an_unrecorded_handover_is_swapped_from_the_old_owner() -> None:
    assert reconcile("host-a", [WEB], {"web": rec("host-b", 2)}, NONE) == [
        HandOver(WEB, "host-b", 2)
    ]


def test_a_newer_or_equal_claim_elsewhere_is_a_conflict_never_an_overwrite() -> None:
    for epoch in (3, 4):
        (c,) = reconcile("host-a", [WEB], {"web": rec("host-b", epoch)}, NONE)
        assert isinstance(c, Conflict) and (c.owner, c.epoch) == ("host-b", epoch)
        assert "host-b" in c.why and "epoch 3" in c.why


def test_a_record_of_a_vm_this_host_no_longer_has_is_released() -> None:
    recorded = {"web": rec("host-a", 3), "db": rec("host-a", 1, "db"), "x": rec("host-b", 1, "x")}
    assert reconcile("host-a", [], recorded, NONE) == [Release("db", 1), Release("web", 3)]
    # an arriving or otherwise live VM keeps its record
    assert reconcile("host-a", [], {"web": rec("host-a", 3)}, frozenset({"web"})) == []


def _vm(name: str, epoch: int, state: str = "running") -> Any:
    spec = SimpleNamespace(tenant="acme", memory_mib=256, vcpus=1)
    return SimpleNamespace(name=name, epoch=epoch, state=state, spec=spec)


class _Vms:
    def __init__(self, *vms: Any) -> None:
        self.list = list(vms)

    def visible(self) -> list[Any]:
        return self.list


def _sync(host: str, url: str, vms: _Vms, tmp: Path, events: list[Any]) -> ClusterSync:
    q = Quarantine(tmp / f"{host}-quarantine.json")
    return ClusterSync(host, url, vms, q, lambda kind, **f: events.append((kind, f)),  # type: ignore[arg-type]
                       lambda: (10, "a" * 64))  # fmt: skip


def test_rounds_catch_up_report_conflicts_and_share_quarantine(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    events: list[Any] = []
    a_vms, b_vms = _Vms(_vm("web", 1), _vm("incoming", 2, "incoming")), _Vms()
    a = _sync("host-a", url, a_vms, tmp_path, events)
    b = _sync("host-b", url, b_vms, tmp_path, events)
    asyncio.run(a.round())
    store = ClusterStore.open(url)
    assert [(v.name, v.owner, v.epoch) for v in store.vms()] == [("web", "host-a", 1)]
    # web moves to host-b (epoch 2) while the store is not told: b's round swaps it over
    a_vms.list, b_vms.list = [], [_vm("web", 2)]
    asyncio.run(b.round())
    assert [(v.owner, v.epoch) for v in store.vms()] == [("host-b", 2)]
    # a stale copy on host-a claims epoch 1 again: a conflict, reported once, nothing written
    a_vms.list = [_vm("web", 1)]
    asyncio.run(a.round())
    asyncio.run(a.round())
    assert [(v.owner, v.epoch) for v in store.vms()] == [("host-b", 2)]
    assert [k for k, _ in events] == ["store.conflict"] and a.status["conflicts"]
    # host-a quarantines a liar: host-b quarantines it too; a clear on host-b lifts both
    a.quarantine.add("host-l", "report_exceeds_attested: 8x")
    asyncio.run(a.round())
    asyncio.run(b.round())
    assert (
        b.quarantine.is_quarantined("host-l")
        == f"{CLUSTER_PREFIX}report_exceeds_attested: 8x (by host-a)"
    )
    asyncio.run(b.clear("host-l", "sam"))
    b.quarantine.clear("host-l", "sam")
    asyncio.run(a.round())
    asyncio.run(b.round())
    assert a.quarantine.is_quarantined("host-l") is None
    assert b.quarantine.is_quarantined("host-l") is None and store.quarantined() == {}
    store.close()
    a.close()
    b.close()


def test_an_unreachable_store_is_a_status_not_an_error(tmp_path: Path) -> None:
    events: list[Any] = []
    s = _sync("host-a", "postgresql+psycopg://x@127.0.0.1:1/db", _Vms(_vm("web", 1)), tmp_path,
              events)  # fmt: skip
    asyncio.run(s.round())
    assert s.status["reachable"] is False and "unreachable" in s.status["error"]
    assert asyncio.run(s.known("host-b")) == {}
