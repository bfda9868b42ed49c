"""The store's tests run on SQLite and on a real PostgreSQL server started for this module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from trustmig.agent.local_pg import PgServer
from trustmig.store import ClusterStore
from trustmig.store.schema import metadata


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    srv = PgServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(params=["sqlite", pytest.param("pg", marks=pytest.mark.pg)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClusterStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cluster.db'}"
    else:
        url = request.getfixturevalue("pg_server").url
    st = ClusterStore.open(url)
    try:
        yield st
    finally:
        if request.param == "pg":
            with st.engine.begin() as conn:
                metadata.drop_all(conn)
        st.close()
