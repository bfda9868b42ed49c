"""Facts and plans as JSON, for the agents that gather a view and the operator who keeps a plan.

A dry-run plan saved with ``--json`` is run later with ``--plan FILE``: only its moves are read
back, and they are replayed against the view read at that moment (:func:`violations`), so a
plan that no longer fits is refused rather than run. Every parser raises
:class:`~trustmig.placement.errors.PlacementError` (code ``bad_facts`` or ``bad_plan``) naming
the field that was wrong.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from trustmig.placement.errors import PlacementError
from trustmig.placement.model import Figures, Goal, HostFacts, Move, Plan, VmFacts

_SETS = ("allowed_hosts", "zones", "countries", "never_with")


def host_to_json(h: HostFacts) -> dict[str, Any]:
    return dict(h.__dict__)


def vm_to_json(v: VmFacts) -> dict[str, Any]:
    doc = dict(v.__dict__)
    for key in _SETS:
        doc[key] = sorted(doc[key])
    return doc


def host_from_json(doc: Any) -> HostFacts:
    """Raises PlacementError(bad_facts) for a document that is not a host's facts."""
    try:
        return HostFacts(**_fields(doc, HostFacts))
    except (TypeError, ValueError) as e:
        raise PlacementError("bad_facts", f"host facts: {e}") from None


def vm_from_json(doc: Any) -> VmFacts:
    """Raises PlacementError(bad_facts) for a document that is not a VM's facts."""
    try:
        given = _fields(doc, VmFacts)
        for key in _SETS:
            if key in given:
                given[key] = frozenset(_strings(given[key], key))
        return VmFacts(**given)
    except (TypeError, ValueError) as e:
        raise PlacementError("bad_facts", f"VM facts: {e}") from None


def _fields(doc: Any, cls: type) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise TypeError("expected an object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise TypeError(f"unknown field {unknown[0]!r}")
    return dict(doc)


def _strings(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise TypeError(f"{key} must be a list of names")
    return value


def saved_plan(doc: Any, goal: Goal) -> Plan:
    """The moves of a plan saved as JSON, as a :class:`Plan` to replay with ``violations``.

    Raises PlacementError(bad_plan) for a document that is not a saved plan of ``goal``."""
    if not isinstance(doc, dict) or not isinstance(doc.get("moves"), list):
        raise PlacementError("bad_plan", "a saved plan is the JSON object --dry-run --json prints")
    if doc.get("goal") != goal.value:
        raise PlacementError("bad_plan", f"the saved plan is for {doc.get('goal')!r}, "
                                         f"not {goal.value!r}")  # fmt: skip
    moves = []
    for i, m in enumerate(doc["moves"]):
        try:
            moves.append(Move(str(m["vm"]), str(m["source"]), str(m["destination"]),
                              str(m.get("why", "saved plan"))))  # fmt: skip
        except (KeyError, TypeError):
            raise PlacementError("bad_plan", f"move {i} needs vm, source and destination") from None
    none = Figures(0, 0, 0, 0.0, 0.0, 0.0)
    freed = doc.get("freed_hosts") or []
    if not isinstance(freed, list) or not all(isinstance(h, str) for h in freed):
        raise PlacementError("bad_plan", "freed_hosts must be a list of host names")
    return Plan(goal, tuple(moves), (), none, none, tuple(freed))
