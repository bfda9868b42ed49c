"""Admission control: concurrency caps, queueing with reasons, hourly VM limit, fairness."""

from __future__ import annotations

import asyncio

import pytest

from trustmig.guard import Admission, AdmissionError, AdmissionLimits


class Clock:
    def __init__(self) -> None:
        self.t = 50_000.0

    def __call__(self) -> float:
        return self.t


def test_third_inbound_is_queued_with_reason_then_admitted_on_release() -> None:
    adm = Admission(AdmissionLimits(), Clock())
    assert adm.request("in", tenant="a", vm="v1", migration_id="m1").status == "admitted"
    assert adm.request("in", tenant="b", vm="v2", migration_id="m2").status == "admitted"
    third = adm.request("in", tenant="c", vm="v3", migration_id="m3")
    assert third.status == "queued"
    assert third.reason == "queued because 2 inbound migrations are running (limit 2); position 1"
    assert third.position == 1 and third.ticket
    # outbound is a separate budget
    assert adm.request("out", tenant="c", vm="v9", migration_id="o1").status == "admitted"

    async def scenario() -> str:
        waiter = asyncio.create_task(adm.wait(third.ticket, timeout=10))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert not waiter.done()
        adm.release("m1")
        return (await waiter).status

    assert asyncio.run(scenario()) == "admitted"
    running = {e["migration_id"] for e in adm.snapshot()["running"]["in"]}
    assert running == {"m2", "m3"}


def test_wait_timeout_returns_still_queued() -> None:
    adm = Admission(AdmissionLimits(max_inbound_per_host=1), Clock())
    adm.request("in", tenant="a", vm="v1", migration_id="m1")
    q = adm.request("in", tenant="a", vm="v2", migration_id="m2")
    res = asyncio.run(adm.wait(q.ticket, timeout=0.05))  # type: ignore[arg-type]
    assert (res.status, res.position) == ("queued", 1)


def test_refused_past_queue_max() -> None:
    adm = Admission(AdmissionLimits(max_inbound_per_host=1, queue_max=2), Clock())
    adm.request("in", tenant="a", vm="v0", migration_id="m0")
    assert adm.request("in", tenant="a", vm="v1", migration_id="m1").status == "queued"
    assert adm.request("in", tenant="b", vm="v2", migration_id="m2").status == "queued"
    r = adm.request("in", tenant="c", vm="v3", migration_id="m3")
    assert r.status == "refused" and r.ticket is None
    assert "inbound queue is full (2 waiting, limit 2)" in r.reason


def test_per_vm_hourly_limit() -> None:
    clock = Clock()
    adm = Admission(AdmissionLimits(), clock)
    for i in range(4):
        assert adm.request("out", tenant="t", vm="web-1", migration_id=f"m{i}").status == (
            "admitted"
        )
        adm.release(f"m{i}", completed=True)
        clock.t += 60
    r = adm.request("out", tenant="t", vm="web-1", migration_id="m5")
    assert r.status == "refused"
    assert (
        r.reason == "refused because VM web-1 already migrated 4 times in the last hour (limit 4)"
    )
    clock.t += 3600 - 4 * 60 + 1  # the first migration left the window
    assert adm.request("out", tenant="t", vm="web-1", migration_id="m5").status == "admitted"


def test_aborted_migrations_do_not_use_up_the_hourly_limit() -> None:
    """A peer's refused or failed prepares must not lock the owner out for an hour."""
    adm = Admission(AdmissionLimits(), Clock())
    for i in range(10):
        assert adm.request("in", tenant="t", vm="web-1", migration_id=f"x{i}").status == (
            "admitted"
        )
        adm.release(f"x{i}")  # aborted: not completed
    assert adm.request("in", tenant="t", vm="web-1", migration_id="ok").status == "admitted"


def test_running_migrations_count_towards_the_hourly_limit() -> None:
    adm = Admission(AdmissionLimits(max_per_vm_per_hour=2, max_outbound_per_host=5), Clock())
    adm.request("out", tenant="t", vm="v", migration_id="a")
    adm.release("a", completed=True)
    adm.request("out", tenant="t", vm="v", migration_id="b")
    r = adm.request("out", tenant="t", vm="v", migration_id="c")
    assert r.status == "refused"
    assert r.reason == (
        "refused because VM v already migrated 1 times in the last hour, 1 more under way (limit 2)"
    )


def test_tenant_cap_queues_only_that_tenant() -> None:
    adm = Admission(AdmissionLimits(max_inbound_per_host=5, max_per_tenant=2), Clock())
    adm.request("in", tenant="greedy", vm="a", migration_id="g1")
    adm.request("in", tenant="greedy", vm="b", migration_id="g2")
    r = adm.request("in", tenant="greedy", vm="c", migration_id="g3")
    assert (
        r.reason == "queued because tenant greedy has 2 inbound migrations running (limit 2); "
        "position 1"
    )
    assert adm.request("in", tenant="polite", vm="d", migration_id="p1").status == "admitted"


def test_round_robin_across_tenants_no_starvation() -> None:
    adm = Admission(AdmissionLimits(max_inbound_per_host=1, max_per_tenant=1), Clock())
    adm.request("in", tenant="x", vm="x0", migration_id="x0")
    tickets = {}
    for i in range(1, 4):  # tenant A floods the queue first
        tickets[f"A{i}"] = adm.request("in", tenant="A", vm=f"a{i}", migration_id=f"A{i}")
    tickets["B1"] = adm.request("in", tenant="B", vm="b1", migration_id="B1")
    tickets["C1"] = adm.request("in", tenant="C", vm="c1", migration_id="C1")
    assert tickets["B1"].position == 2 and tickets["C1"].position == 3
    assert adm.status(tickets["A2"].ticket).position == 4  # type: ignore[arg-type]
    order = []
    current = "x0"
    for _ in range(5):
        adm.release(current)
        (current,) = [e["migration_id"] for e in adm.snapshot()["running"]["in"]]
        order.append(current)
    assert order == ["A1", "B1", "C1", "A2", "A3"]


def test_queue_timeout_refuses_waiter() -> None:
    clock = Clock()
    adm = Admission(AdmissionLimits(max_inbound_per_host=1, queue_timeout_s=300), clock)
    adm.request("in", tenant="a", vm="v1", migration_id="m1")
    q = adm.request("in", tenant="a", vm="v2", migration_id="m2")
    clock.t += 301
    res = asyncio.run(adm.wait(q.ticket, timeout=1))  # type: ignore[arg-type]
    assert res.status == "refused" and "waited 300 s in the queue" in res.reason
    adm.release("m1")
    assert adm.snapshot()["running"]["in"] == []


def test_bad_inputs_raise_clear_errors() -> None:
    adm = Admission(AdmissionLimits(), Clock())
    with pytest.raises(AdmissionError, match="direction must be 'in' or 'out'"):
        adm.request("sideways", tenant="a", vm="v", migration_id="m")  # type: ignore[arg-type]
    adm.request("in", tenant="a", vm="v", migration_id="m")
    with pytest.raises(AdmissionError, match="already has an admission request"):
        adm.request("in", tenant="a", vm="v", migration_id="m")
    with pytest.raises(AdmissionError, match="holds no admission slot"):
        adm.release("nope")
    with pytest.raises(AdmissionError, match="max_per_tenant"):
        AdmissionLimits(max_per_tenant=0)
