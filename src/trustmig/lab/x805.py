"""The ITU-T X.805 security architecture as data, so the attack lab's report is organised by it.

X.805 describes security as eight *dimensions* applied across three *layers* and three *planes*.
Every lab attack declares which of the resulting 72 cells it exercises; :func:`coverage` turns
the lab's results into a per-cell verdict. Keeping the model in one place (and validating cell
names loudly) means an attack module cannot silently claim a cell that does not exist, and the
report can show which parts of the architecture no attack has tested yet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

DIMENSIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "access_control": "Access control",
        "authentication": "Authentication",
        "non_repudiation": "Non-repudiation",
        "data_confidentiality": "Data confidentiality",
        "communication_security": "Communication security",
        "data_integrity": "Data integrity",
        "availability": "Availability",
        "privacy": "Privacy",
    }
)
"""The eight security dimensions, id → display name, in X.805 order."""

LAYERS: Final[Mapping[str, str]] = MappingProxyType(
    {"infrastructure": "Infrastructure", "services": "Services", "applications": "Applications"}
)
"""The three security layers, id → display name, bottom-up."""

PLANES: Final[Mapping[str, str]] = MappingProxyType(
    {"management": "Management", "control": "Control", "end_user": "End-user"}
)
"""The three security planes, id → display name."""

COLUMNS: Final[tuple[tuple[str, str], ...]] = tuple((lay, pl) for lay in LAYERS for pl in PLANES)
"""The nine (layer, plane) combinations, layer-major: the columns of the report's matrix."""

TOTAL_CELLS: Final[int] = len(DIMENSIONS) * len(COLUMNS)

Status = Literal["protected", "breached", "uncovered"]


def _check(kind: str, value: str, allowed: Mapping[str, str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown X.805 {kind} {value!r}; expected one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class Cell:
    """One (dimension, layer, plane) cell; constructing it with unknown ids raises ValueError."""

    dimension: str
    layer: str
    plane: str

    def __post_init__(self) -> None:
        _check("dimension", self.dimension, DIMENSIONS)
        _check("layer", self.layer, LAYERS)
        _check("plane", self.plane, PLANES)


def _normalise(value: str) -> str:
    return value.strip().lower().replace("-", "_").replace(" ", "_")


def cell(dimension: str, layer: str, plane: str) -> Cell:
    """Build a validated :class:`Cell`, accepting display spellings ("End-user", "Data integrity").

    Raises ValueError naming the bad value and the allowed ids.
    """
    return Cell(_normalise(dimension), _normalise(layer), _normalise(plane))


def all_cells() -> list[Cell]:
    """All 72 cells in report order: dimension-major, then layer, then plane."""
    return [Cell(d, lay, pl) for d in DIMENSIONS for (lay, pl) in COLUMNS]


def cell_from_dict(entry: Mapping[str, Any], attack: str = "?") -> Cell:
    """Parse one ``{"dimension", "layer", "plane"}`` entry of an attack's ``x805`` list."""
    missing = [k for k in ("dimension", "layer", "plane") if not isinstance(entry.get(k), str)]
    if missing:
        raise ValueError(
            f"attack {attack!r}: X.805 entry {dict(entry)!r} lacks string key(s) {missing}"
        )
    try:
        return cell(entry["dimension"], entry["layer"], entry["plane"])
    except ValueError as e:
        raise ValueError(f"attack {attack!r}: {e}") from None


def outcome(attack: Mapping[str, Any], target: str) -> bool | None:
    """Whether ``target`` ("baseline" or "trustmig") was compromised; None if it did not run.

    Prefers the attack's top-level ``<target>_compromised`` and falls back to the nested
    ``<target>.compromised``.
    """
    value = attack.get(f"{target}_compromised")
    if value is None:
        nested = attack.get(target)
        if isinstance(nested, Mapping):
            value = nested.get("compromised")
    return value if isinstance(value, bool) else None


def cell_status(trustmig_outcomes: Sequence[bool | None]) -> Status:
    """Verdict for one cell from the trustmig outcomes of the attacks that cover it.

    "breached" if any attack compromised trustmig; "protected" if at least one attack actually
    ran against trustmig and none compromised it; otherwise "uncovered" (no attack, or only
    attacks that failed to run: an attack that never ran is no evidence of protection).
    """
    if any(o is True for o in trustmig_outcomes):
        return "breached"
    if any(o is False for o in trustmig_outcomes):
        return "protected"
    return "uncovered"


def _attack_cells(attack: Mapping[str, Any]) -> list[Cell]:
    name = str(attack.get("name", "?"))
    entries = attack.get("x805") or []
    if not isinstance(entries, list):
        raise ValueError(f"attack {name!r}: 'x805' must be a list of cells, not {entries!r}")
    return [cell_from_dict(e if isinstance(e, Mapping) else {}, name) for e in entries]


def coverage(attacks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-cell coverage of the 72 X.805 cells by the report's attacks.

    Returns ``{"cells": [{"dimension", "layer", "plane", "attacks": [{"name",
    "trustmig_compromised", "baseline_compromised"}], "status"}], "covered", "uncovered",
    "protected", "breached", "total"}`` with cells in :func:`all_cells` order. Raises ValueError
    if an attack names a cell outside the model.
    """
    by_cell: dict[Cell, list[dict[str, Any]]] = {c: [] for c in all_cells()}
    for attack in attacks:
        entry = {
            "name": str(attack.get("name", "?")),
            "trustmig_compromised": outcome(attack, "trustmig"),
            "baseline_compromised": outcome(attack, "baseline"),
        }
        for c in dict.fromkeys(_attack_cells(attack)):  # de-duplicate, keep order
            by_cell[c].append(entry)
    cells = [_cell_entry(c, covering) for c, covering in by_cell.items()]
    counts = {s: sum(1 for c in cells if c["status"] == s) for s in ("protected", "breached")}
    covered = counts["protected"] + counts["breached"]
    return {
        "cells": cells,
        "covered": covered,
        "uncovered": TOTAL_CELLS - covered,
        "protected": counts["protected"],
        "breached": counts["breached"],
        "total": TOTAL_CELLS,
    }


def _cell_entry(c: Cell, covering: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "dimension": c.dimension,
        "layer": c.layer,
        "plane": c.plane,
        "attacks": [dict(a) for a in covering],
        "status": cell_status([a["trustmig_compromised"] for a in covering]),
    }
