"""Holding a trail against its witnesses: truncated, rewritten, consistent, unanchored."""

from __future__ import annotations

from trustmig.audit.anchor import Witness, check_anchor

CHAIN = {n: f"h{n:02d}" + "0" * 60 for n in range(1, 20)}


def hash_at(n: int) -> str | None:
    return CHAIN.get(n)


def test_consistent_witnesses() -> None:
    v = check_anchor("a", 19, hash_at, [Witness("b", 19, CHAIN[19]), Witness("c", 7, CHAIN[7])])
    assert v.code == "ok" and not v.lost
    assert v.detail == "consistent with 2 witness(es), the longest b at 19 events"


def test_an_emptied_trail_is_truncated() -> None:
    v = check_anchor("a", 2, lambda n: {1: "x", 2: "y"}.get(n), [Witness("b", 19, CHAIN[19])])
    assert v.code == "truncated" and v.lost
    assert v.detail == "audit trail of a holds 2 events but b witnessed 19 (head h19000000000)"


def test_a_rebuilt_chain_of_the_same_length_is_rewritten() -> None:
    v = check_anchor("a", 19, lambda n: "f" * 64, [Witness("b", 19, CHAIN[19])])
    assert v.code == "rewritten"
    assert v.detail.startswith("event 19 of a's audit trail has hash ffffffffffff, but b")


def test_no_witness_is_unanchored_not_ok() -> None:
    assert check_anchor("a", 5, hash_at, []).code == "unanchored"
    assert check_anchor("a", 5, hash_at, [Witness("b", 0, "")]).code == "unanchored"


def test_the_worst_finding_decides() -> None:
    v = check_anchor("a", 10, hash_at, [Witness("b", 5, "bad"), Witness("c", 12, CHAIN[12])])
    assert v.code == "truncated" and "c witnessed 12" in v.detail
