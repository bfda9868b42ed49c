"""The migration cores are pure: no I/O, no threads, no clock, no QEMU."""

from __future__ import annotations

import ast
from pathlib import Path

import trustmig.migration

FORBIDDEN = {
    "asyncio", "socket", "threading", "time", "subprocess", "os", "selectors", "signal",
    "multiprocessing", "datetime", "random", "qemu", "sqlalchemy",
}  # fmt: skip
FORBIDDEN_PREFIXES = ("trustmig.agent", "trustmig.hypervisor", "trustmig.channel", "trustmig.cli")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_module_of_the_package_does_io_or_reads_a_clock() -> None:
    pkg = Path(trustmig.migration.__file__).parent
    modules = sorted(pkg.glob("*.py"))
    assert len(modules) >= 5
    for mod in modules:
        for name in _imports(mod):
            root = name.split(".")[0]
            assert root not in FORBIDDEN, f"{mod.name} imports {name}"
            assert not name.startswith(FORBIDDEN_PREFIXES), f"{mod.name} imports {name}"
            allowed = ("trustmig.migration", "__future__", "collections", "dataclasses", "enum")
            assert name.startswith((*allowed, "typing")), f"{mod.name}: {name}"
