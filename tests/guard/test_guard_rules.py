"""Rule matching and connection tracking of the guard, with an injected clock."""

from __future__ import annotations

import json
import random

import pytest

from trustmig.guard import ConnState, Guard, GuardRules, InvalidRulesError
from trustmig.guard.errors import GuardError, UnknownConnectionError


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def make(**kw: object) -> tuple[Guard, Clock]:
    clock = Clock()
    return Guard(GuardRules(**kw), clock), clock  # type: ignore[arg-type]


def test_network_allow_list_accepts_inside_refuses_outside() -> None:
    g, _ = make(allowed_networks=["127.0.0.0/8", "fd00::/8"])
    v, cid = g.on_connect("control", "127.0.0.5", 4000)
    assert v.accept and cid is not None and g.get(cid).state is ConnState.NEW
    v, cid = g.on_connect("control", "10.1.2.3", 4000)
    assert not v.accept and cid is None and v.rule == "network"
    assert "10.1.2.3" in v.reason
    assert g.on_connect("control", "fd00::7", 1)[0].accept
    assert g.on_connect("control", "::ffff:127.0.0.9", 1)[0].accept  # v4-mapped
    assert not g.on_connect("control", "not-an-ip", 1)[0].accept
    assert g.counters()["network"] == 2


def test_bad_rules_are_refused_with_a_clear_message() -> None:
    with pytest.raises(InvalidRulesError, match=r"host bits set; did you mean 10.0.0.0/8"):
        GuardRules(allowed_networks=["10.0.0.1/8"])
    with pytest.raises(InvalidRulesError, match="not a CIDR"):
        GuardRules(allowed_networks=["lan"])
    with pytest.raises(InvalidRulesError, match="max_half_open"):
        GuardRules(max_half_open=0)
    with pytest.raises(InvalidRulesError, match="handshake_deadline_s"):
        GuardRules(handshake_deadline_s=float("nan"))


def test_per_peer_rate_limit_is_a_token_bucket_with_double_burst() -> None:
    g, clock = make(max_conn_rate_per_peer=2.0)
    accepted = []
    for _ in range(4):  # burst = 4
        v, cid = g.on_connect("data", "127.0.0.2", 1)
        assert v.accept
        accepted.append(cid)
        g.on_close(cid)  # type: ignore[arg-type]
    v, _ = g.on_connect("data", "127.0.0.2", 1)
    assert not v.accept and v.rule == "rate"
    assert g.on_connect("data", "127.0.0.3", 1)[0].accept  # other peers unaffected
    clock.advance(0.5)  # one token back
    assert g.on_connect("data", "127.0.0.2", 1)[0].accept
    assert not g.on_connect("data", "127.0.0.2", 1)[0].accept
    assert g.counters()["rate"] == 2


def test_half_open_caps_per_peer_and_global() -> None:
    g, _ = make(max_half_open=3, max_half_open_per_peer=2)
    assert g.on_connect("c", "127.0.0.1", 1)[0].accept
    assert g.on_connect("c", "127.0.0.1", 2)[0].accept
    v, _ = g.on_connect("c", "127.0.0.1", 3)
    assert (v.accept, v.rule) == (False, "half_open_per_peer")
    v, cid = g.on_connect("c", "127.0.0.2", 1)
    assert v.accept
    v, _ = g.on_connect("c", "127.0.0.3", 1)
    assert (v.accept, v.rule) == (False, "half_open")
    assert "limit 3" in v.reason
    # finishing a handshake frees a half-open slot
    assert g.on_authenticated(cid, "host-b").accept  # type: ignore[arg-type]
    assert g.on_connect("c", "127.0.0.3", 1)[0].accept


def test_session_caps_global_and_per_peer() -> None:
    g, _ = make(max_sessions=2, max_sessions_per_peer=1)
    _, a = g.on_connect("c", "127.0.0.1", 1)
    assert g.on_authenticated(a, "h1").accept  # type: ignore[arg-type]
    v, _ = g.on_connect("c", "127.0.0.1", 2)
    assert (v.accept, v.rule) == (False, "sessions_per_peer")
    _, b = g.on_connect("c", "127.0.0.2", 1)
    assert g.on_authenticated(b, "h2").accept  # type: ignore[arg-type]
    v, _ = g.on_connect("c", "127.0.0.3", 1)
    assert (v.accept, v.rule) == (False, "sessions")


def test_identity_allow_list() -> None:
    g, _ = make(allowed_identities=["host-b", "alice"])
    _, good = g.on_connect("c", "127.0.0.1", 1)
    g.on_handshake_progress(good, "tls-started")  # type: ignore[arg-type]
    assert g.get(good).state is ConnState.HANDSHAKE  # type: ignore[arg-type]
    v = g.on_authenticated(good, "host-b")  # type: ignore[arg-type]
    assert v.accept
    rec = g.get(good)  # type: ignore[arg-type]
    assert rec.state is ConnState.ESTABLISHED and rec.identity == "host-b"
    _, bad = g.on_connect("c", "127.0.0.1", 2)
    v = g.on_authenticated(bad, "mallory")  # type: ignore[arg-type]
    assert (v.accept, v.rule) == (False, "identity")
    assert g.get(bad).state is ConnState.DROPPED  # type: ignore[arg-type]
    assert g.counters()["identity"] == 1


def test_any_authenticated_identity_when_list_is_none() -> None:
    g, _ = make()
    _, cid = g.on_connect("c", "127.0.0.1", 1)
    assert g.on_authenticated(cid, "anyone").accept  # type: ignore[arg-type]


def test_sweep_handshake_deadline_not_extended_by_progress() -> None:
    g, clock = make(handshake_deadline_s=5.0)
    _, cid = g.on_connect("c", "127.0.0.1", 1)
    for step in ("a", "b", "c", "d"):
        clock.advance(1.2)
        g.on_handshake_progress(cid, step)  # type: ignore[arg-type]
    assert g.sweep() == []
    clock.advance(0.3)  # 5.1 s since connect
    dropped = g.sweep()
    assert [d[0] for d in dropped] == [cid]
    assert "last step d" in dropped[0][1]
    assert g.get(cid).state is ConnState.DROPPED  # type: ignore[arg-type]
    assert g.counters()["handshake_deadline"] == 1
    assert g.on_authenticated(cid, "late").rule == "closed"  # type: ignore[arg-type]


def test_sweep_idle_and_stall() -> None:
    g, clock = make(idle_timeout_s=60.0, stall_timeout_s=30.0)
    _, ctl = g.on_connect("control", "127.0.0.1", 1)
    _, data = g.on_connect("data", "127.0.0.1", 2)
    g.on_authenticated(ctl, "h")  # type: ignore[arg-type]
    g.on_authenticated(data, "h")  # type: ignore[arg-type]
    g.on_data_phase(data)  # type: ignore[arg-type]
    clock.advance(20)
    g.on_bytes(data, n_in=4096)  # type: ignore[arg-type]
    clock.advance(29)
    assert g.sweep() == []
    clock.advance(2)  # 31 s without bytes in the data phase; control idle 51 s
    assert g.sweep() == [(data, "no bytes for 30 s during data transfer")]
    g.on_bytes(ctl, n_out=10)  # type: ignore[arg-type]
    clock.advance(60.5)
    assert g.sweep() == [(ctl, "idle for 60 s")]
    assert g.counters()["stall"] == 1 and g.counters()["idle"] == 1
    assert g.get(data).bytes_in == 4096  # type: ignore[arg-type]
    assert g.get(ctl).bytes_out == 10  # type: ignore[arg-type]


def test_close_is_idempotent_and_unknown_ids_are_errors() -> None:
    g, _ = make()
    _, cid = g.on_connect("c", "127.0.0.1", 1)
    g.on_close(cid)  # type: ignore[arg-type]
    g.on_close(cid)  # type: ignore[arg-type]
    g.on_bytes(cid, 5)  # type: ignore[arg-type]
    assert g.get(cid).state is ConnState.CLOSED  # type: ignore[arg-type]
    assert g.get(cid).bytes_in == 0  # type: ignore[arg-type]
    with pytest.raises(UnknownConnectionError, match="never issued"):
        g.on_bytes(999, 1)


def test_snapshot_is_json_with_connections_counters_rules() -> None:
    g, _ = make()
    _, cid = g.on_connect("control", "127.0.0.1", 4444)
    g.on_connect("control", "192.0.2.1", 1)
    snap = json.loads(json.dumps(g.snapshot()))
    assert snap["connections"][0]["id"] == cid
    assert snap["connections"][0]["state"] == "new"
    assert snap["counters"] == {"accept": 1, "network": 1}
    assert snap["rules"]["allowed_networks"] == ["127.0.0.0/8"]
    assert snap["summary"]["half_open"] == 1


def test_memory_stays_bounded_under_100k_connects_from_random_peers() -> None:
    rules = GuardRules(allowed_networks=["10.0.0.0/8"])
    clock = Clock()
    g = Guard(rules, clock, peer_capacity=4096, history=256)
    rng = random.Random(7)
    accepted = 0
    for i in range(100_000):
        ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
        _v, cid = g.on_connect("data", ip, 1024 + i % 60000)
        if cid is not None:
            accepted += 1
            if i % 3 == 0:
                g.on_close(cid)
        if i % 1000 == 0:
            clock.advance(1.0)
            g.sweep()
        assert g.table_size <= rules.max_half_open + rules.max_sessions
    assert g.tracked_peers <= 4096
    assert g.history_size <= 256
    assert len(g.snapshot()["connections"]) <= rules.max_half_open + rules.max_sessions + 256
    assert accepted > 500  # sweeps keep reclaiming slots: the flood never wedges the table
    assert g.counters()["half_open"] > 0


def test_cluster_peers_keep_their_slots_when_a_flood_fills_the_global_table() -> None:
    g, _ = make(max_half_open=4, max_half_open_per_peer=2, reserved_peers=["127.0.0.1"])
    for i in range(2, 4):  # two flooding addresses fill the global half-open table
        for port in (1, 2):
            assert g.on_connect("c", f"127.0.0.{i}", port)[0].accept
    v, _ = g.on_connect("c", "127.0.0.9", 1)
    assert (v.accept, v.rule) == (False, "half_open")
    # the cluster's own host still gets in, up to its per-peer limit
    assert g.on_connect("c", "127.0.0.1", 1)[0].accept
    assert g.on_connect("c", "127.0.0.1", 2)[0].accept
    v, _ = g.on_connect("c", "127.0.0.1", 3)
    assert (v.accept, v.rule) == (False, "half_open_per_peer")
    with pytest.raises(InvalidRulesError, match="reserved_peers"):
        GuardRules(reserved_peers=["host-b"])


def test_strangers_share_one_connection_budget_cluster_peers_do_not() -> None:
    g, clock = make(max_conn_rate_per_peer=100, max_conn_rate_strangers=5,
                    reserved_peers=["127.0.0.1"])  # fmt: skip
    admitted = [g.on_connect("c", f"127.0.0.{10 + i}", 1)[0] for i in range(12)]
    assert sum(v.accept for v in admitted) == 10  # burst = 2 x rate, across all addresses
    assert admitted[-1].rule == "rate_strangers" and "strangers" in admitted[-1].reason
    assert g.on_connect("c", "127.0.0.1", 1)[0].accept  # a cluster peer is not a stranger
    clock.advance(1.0)
    assert g.on_connect("c", "127.0.0.99", 1)[0].accept  # the budget refills at the rate


# ---------------------------------------------------------------- gated listeners (data port)
def test_a_gated_connection_waits_unproven_and_counts_in_no_per_peer_budget() -> None:
    g, _ = make(max_conn_rate_per_peer=1.0, max_half_open_per_peer=1)
    ids = []
    for port in range(10):  # far past the per-peer rate and half-open caps: none apply here
        gate = g.on_connect_gated("data", "127.0.0.1", port)
        assert gate.verdict.accept and gate.conn_id is not None and gate.evicted == ()
        ids.append(gate.conn_id)
    assert {g.get(i).state for i in ids} == {ConnState.UNPROVEN}
    snap = g.snapshot()["summary"]
    assert snap["unproven"] == 10 and snap["half_open"] == 0
    # and the control port's budget for the same address is untouched
    assert g.on_connect("control", "127.0.0.1", 1)[0].accept


def test_outside_the_allowed_networks_a_gated_connection_is_refused() -> None:
    g, _ = make(listener_networks={"data": ["10.9.0.0/24"]})
    gate = g.on_connect_gated("data", "127.0.0.1", 1)
    assert not gate.verdict.accept and gate.conn_id is None and gate.verdict.rule == "network"


def test_a_full_waiting_room_evicts_its_oldest_for_the_newcomer() -> None:
    g, clock = make(max_unproven=3)
    first = [g.on_connect_gated("data", "127.0.0.1", p).conn_id for p in range(3)]
    clock.advance(0.01)
    gate = g.on_connect_gated("data", "127.0.0.1", 99)
    assert gate.verdict.accept and gate.evicted == (first[0],)
    assert g.get(first[0]).state is ConnState.DROPPED
    assert "evicted unproven" in (g.get(first[0]).end_reason or "")
    assert gate.conn_id is not None
    assert g.on_proven(gate.conn_id, "admit").accept  # the newcomer proves itself at once
    assert g.get(gate.conn_id).state is ConnState.NEW
    assert g.counters()["evicted"] == 1 and g.counters()["proven"] == 1
    assert not g.on_proven(first[0], "admit").accept  # an evicted waiter cannot come back


def test_proven_connections_run_the_ordinary_handshake_deadline() -> None:
    g, clock = make(handshake_deadline_s=5.0, proof_deadline_s=1.0)
    cid = g.on_connect_gated("data", "127.0.0.1", 1).conn_id
    assert cid is not None and g.on_proven(cid, "stream-join").accept
    clock.advance(2.0)
    assert g.expire_unproven() == [] and g.sweep() == []
    clock.advance(3.5)
    assert [c for c, _ in g.sweep()] == [cid]
    other = g.on_connect_gated("data", "127.0.0.1", 2).conn_id
    assert other is not None and g.on_proven(other, "admit").accept
    with pytest.raises(GuardError, match="is new, not unproven"):
        g.on_proven(other, "admit")


def test_waiters_past_the_proof_deadline_are_dropped_by_the_gate_not_the_sweeper() -> None:
    g, clock = make(proof_deadline_s=1.0)
    cid = g.on_connect_gated("data", "127.0.0.1", 1).conn_id
    clock.advance(1.5)
    assert g.sweep() == []  # the sweeper leaves waiters to the gate
    assert g.expire_unproven() == [cid] and not g.is_live(cid or 0)
    assert g.counters()["proof_deadline"] == 1 and g.expire_unproven() == []


def test_a_failed_proof_is_counted_under_its_own_rule() -> None:
    g, _ = make()
    cid = g.on_connect_gated("data", "127.0.0.1", 1).conn_id
    assert cid is not None
    g.on_proof_failed(cid, "admit_bad_mac", "wrong MAC")
    g.on_proof_failed(cid, "admit_bad_mac", "twice is a no-op")
    assert g.counters()["admit_bad_mac"] == 1 and g.get(cid).end_reason == "wrong MAC"
    assert g.snapshot()["summary"]["unproven"] == 0
