"""What an agent must write so that the store agrees with what it really runs (sans-IO).

An agent does not queue individual writes while the store is down. Each round it compares the
VMs it holds (its own journal is the truth about its guests) with the store's records and
derives the writes that make them agree, like a level-triggered controller. A round after an
outage therefore catches up with everything that happened during it, in one pass, whatever
was missed:

* a VM the store does not know: ``Place`` it here;
* a VM the store places on another host at an *older* epoch: this host took it over in a
  handover the store has not seen; ``HandOver`` with a compare-and-swap on that old owner and
  epoch (if a third host moved it meanwhile, the swap fails and nothing is overwritten);
* a record of this host's for a VM it no longer has: ``Release`` it (the VM stopped, or left;
  the new owner's round records it there);
* a VM the store places elsewhere at the same or a newer epoch: a ``Conflict`` to report. This
  host's copy is stale or the store was written by someone else; the agent never resolves it
  by itself (never two copies, never a silent overwrite).
"""

from __future__ import annotations

from dataclasses import dataclass

from trustmig.store.store import VmRecord


@dataclass(frozen=True)
class HeldVm:
    """A guest this host owns now (running, paused, or migrating out before commit)."""

    name: str
    tenant: str
    epoch: int
    mem_mib: int
    vcpus: int


@dataclass(frozen=True)
class Place:
    vm: HeldVm


@dataclass(frozen=True)
class HandOver:
    vm: HeldVm
    from_host: str
    from_epoch: int


@dataclass(frozen=True)
class Conflict:
    vm: str
    owner: str
    epoch: int
    why: str


@dataclass(frozen=True)
class Release:
    """A record of this host's for a VM it no longer has at all (stopped, or handed over):
    deleted with a compare-and-swap on owner and epoch."""

    vm: str
    epoch: int


SyncAction = Place | HandOver | Conflict | Release


def reconcile(
    host: str, held: list[HeldVm], recorded: dict[str, VmRecord], present: frozenset[str]
) -> list[SyncAction]:
    """The writes (and conflicts) that make the store agree with ``held``, in name order.
    ``present``: every VM this host has in any live state (arriving ones included), whose
    records it must not release."""
    actions: list[SyncAction] = []
    held_names = {v.name for v in held}
    for name, mine in sorted(recorded.items()):
        if mine.owner == host and name not in held_names and name not in present:
            actions.append(Release(name, mine.epoch))
    for vm in sorted(held, key=lambda v: v.name):
        rec = recorded.get(vm.name)
        if rec is None:
            actions.append(Place(vm))
        elif rec.owner == host:
            if rec.epoch < vm.epoch or (rec.mem_mib, rec.vcpus) != (vm.mem_mib, vm.vcpus):
                actions.append(Place(vm))
        elif rec.epoch < vm.epoch:
            actions.append(HandOver(vm, rec.owner, rec.epoch))
        else:
            why = (f"the store places {vm.name} on {rec.owner} at epoch {rec.epoch}, and "
                   f"{host} holds it at epoch {vm.epoch}")  # fmt: skip
            actions.append(Conflict(vm.name, rec.owner, rec.epoch, why))
    return actions
