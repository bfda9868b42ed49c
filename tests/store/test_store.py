"""The cluster store on SQLite and on PostgreSQL: one owner per VM, whatever the race."""

from __future__ import annotations

import threading

import pytest

from trustmig.store import ClusterStore, OwnershipConflict, StoreError, StoreUnavailable


def test_a_vm_is_placed_once_and_released_only_by_its_owner(store: ClusterStore) -> None:
    store.place("web", "acme", "host-a", 1, 512, 2)
    store.place("web", "acme", "host-a", 1, 512, 2)  # idempotent
    with pytest.raises(OwnershipConflict) as e:
        store.place("web", "acme", "host-b", 1, 512, 2)
    assert (e.value.owner, e.value.epoch, e.value.code) == ("host-a", 1, "conflict")
    assert [v.name for v in store.vms("host-a")] == ["web"]
    assert store.vms("host-b") == []
    assert store.release("web", "host-b") is False
    assert store.release("web", "host-a") is True
    assert store.owner("web") is None


def test_a_handover_is_a_compare_and_swap_on_owner_and_epoch(store: ClusterStore) -> None:
    store.place("web", "acme", "host-a", 3, 512, 2)
    store.hand_over("web", "host-a", 3, "host-b", 4)
    rec = store.owner("web")
    assert rec is not None and (rec.owner, rec.epoch) == ("host-b", 4)
    store.hand_over("web", "host-a", 3, "host-b", 4)  # the same handover replayed: no-op
    with pytest.raises(OwnershipConflict, match="host-b at epoch 4"):
        store.hand_over("web", "host-a", 3, "host-c", 4)  # stale: someone moved it first
    with pytest.raises(OwnershipConflict):
        store.hand_over("web", "host-c", 4, "host-a", 5)  # not the owner
    with pytest.raises(OwnershipConflict, match="on None"):
        store.hand_over("ghost", "host-a", 1, "host-b", 2)
    with pytest.raises(StoreError, match="new epoch"):
        store.hand_over("web", "host-b", 4, "host-a", 4)


def test_racing_handovers_leave_exactly_one_owner(store: ClusterStore) -> None:
    store.place("db", "acme", "host-a", 1, 1024, 2)
    won: list[str] = []
    lost: list[str] = []
    start = threading.Barrier(8)

    def race(dest: str) -> None:
        start.wait()
        try:
            store.hand_over("db", "host-a", 1, dest, 2)
            won.append(dest)
        except OwnershipConflict:
            lost.append(dest)

    threads = [threading.Thread(target=race, args=(f"host-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec = store.owner("db")
    assert len(won) == 1 and len(lost) == 7
    assert rec is not None and (rec.owner, rec.epoch) == (won[0], 2)


def test_quarantine_is_cluster_wide_and_cleared_once(store: ClusterStore) -> None:
    store.quarantine("host-l", "report_exceeds_attested: 8x", by_host="host-a")
    store.quarantine("host-l", "second opinion", by_host="host-b")  # the first entry stays
    q = store.quarantined()
    assert list(q) == ["host-l"] and q["host-l"]["by_host"] == "host-a"
    cleared = store.clear_quarantine("host-l", "sam")
    assert cleared["cleared_by"] == "sam" and "8x" in cleared["reason"]
    with pytest.raises(StoreError, match="not quarantined"):
        store.clear_quarantine("host-l", "sam")
    assert store.quarantined() == {}
    with pytest.raises(StoreError, match="host name and a reason"):
        store.quarantine("", "x", by_host="host-a")


def test_a_truncated_or_rewritten_audit_trail_shows(store: ClusterStore) -> None:
    assert store.check_audit_head("host-a", 10, "a" * 64).verdict == "ok"
    assert store.check_audit_head("host-a", 12, "b" * 64).verdict == "ok"
    shorter = store.check_audit_head("host-a", 5, "c" * 64)
    assert (shorter.verdict, shorter.known_length) == ("shorter", 12)
    assert store.check_audit_head("host-a", 12, "d" * 64).verdict == "diverged"
    assert store.check_audit_head("host-a", 12, "b" * 64).verdict == "ok"


def test_hosts_and_migrations_are_recorded(store: ClusterStore) -> None:
    store.record_attestation("host-b", True, "verified pcr_digest=ab", (4096, 4))
    store.record_load("host-b", {"host_cpu_cores": 0.5, "vms": []})
    store.record_attestation("host-r", False, "qemu-binary not approved", None)
    hosts = store.hosts()
    assert hosts["host-b"]["attested"] is True and hosts["host-b"]["capacity_mem_mib"] == 4096
    assert hosts["host-b"]["load"] == {"host_cpu_cores": 0.5, "vms": []}
    assert hosts["host-r"]["attested"] is False and hosts["host-r"]["load"] is None
    store.migration("m1", "web", "host-a", "host-b", "transferring")
    store.migration("m1", "web", "host-a", "host-b", "completed")
    (m,) = store.migrations()
    assert (m["id"], m["state"]) == ("m1", "completed")


def test_bad_urls_are_named() -> None:
    with pytest.raises(StoreError, match="not a database URL"):
        ClusterStore.open("nonsense")
    with pytest.raises(StoreError, match="use postgresql"):
        ClusterStore.open("mysql://x@127.0.0.1/db")


@pytest.mark.pg
def test_an_unreachable_store_raises_unavailable_and_recovers(pg_server) -> None:  # type: ignore[no-untyped-def]
    st = ClusterStore.open(pg_server.url)
    try:
        st.place("web", "acme", "host-a", 1, 512, 2)
        pg_server.kill()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            st.hand_over("web", "host-a", 1, "host-b", 2)
        pg_server.start()
        st.hand_over("web", "host-a", 1, "host-b", 2)  # the queued write, replayed
        rec = st.owner("web")
        assert rec is not None and rec.owner == "host-b"
        st.release("web", "host-b")
    finally:
        st.close()
