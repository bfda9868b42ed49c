"""The attack modules, in the order the lab runs and reports them."""

from __future__ import annotations

from trustmig.lab.attack import Attack
from trustmig.lab.attacks import (
    balancer,
    co_residency,
    connection_abort,
    control_plane,
    disk_stream,
    eavesdrop,
    false_resources,
    flood,
    inter_vm,
    malformed_stream,
    memory_rewrite,
    replay,
    rogue_destination,
    sshd_rewrite,
    unauthorized,
)

ATTACKS: tuple[Attack, ...] = (
    eavesdrop.ATTACK,
    memory_rewrite.ATTACK,
    sshd_rewrite.ATTACK,
    disk_stream.ATTACK,
    replay.ATTACK,
    unauthorized.ATTACK,
    control_plane.ATTACK,
    rogue_destination.ATTACK,
    false_resources.ATTACK,
    balancer.ATTACK,
    co_residency.ATTACK,
    inter_vm.ATTACK,
    flood.ATTACK,
    malformed_stream.ATTACK,
    connection_abort.ATTACK,
)
BY_NAME = {a.name: a for a in ATTACKS}
