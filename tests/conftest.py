"""Shared fixtures: real local clusters (CA, hosts, agent processes) in temporary directories."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from trustmig.agent.local_cluster import LocalCluster


@pytest.fixture(scope="session")
def guest_image() -> Any:
    from trustmig.hypervisor.image import build_image

    return build_image()


@pytest.fixture
def make_cluster(tmp_path: Path, guest_image: Any) -> Iterator[Callable[..., LocalCluster]]:
    """Build and start a local cluster; agents (and their QEMUs) are stopped by PID afterwards."""
    made: list[LocalCluster] = []

    def _make(
        hosts: tuple[str, ...] = ("host-a", "host-b"), defer_start: bool = False, **setup: Any
    ) -> LocalCluster:
        c = LocalCluster(tmp_path / f"cluster{len(made)}", hosts)
        made.append(c)
        c.setup(**setup)
        c.add_user("alice", ["owner", "operator"], tenant="acme")
        if not defer_start:
            c.start_agents()
        return c

    yield _make
    for c in made:
        c.stop()
