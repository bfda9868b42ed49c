"""Hosts in network namespaces: separate management, migration and guest networks, a Debian guest
whose clients stay connected while it migrates, and the agents' ports closed by the kernel to
everyone but their own segment."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trustmig.agent.local_cluster import NETNS_CONTROL_PORT, NETNS_DATA_PORT, LocalCluster
from trustmig.hypervisor.debian import (
    DebianImage,
    build_debian_image,
    create_overlay,
    debian_definition,
    guest_ssh,
    ssh_argv,
    wait_for_ssh,
)
from trustmig.netns.clients import ECHO_PORT, ECHO_SERVER, SSH_LOOP, ClientProbe
from trustmig.netns.enter import connect_in
from trustmig.netns.topology import GUEST_BRIDGE, NetLab, existing_namespaces

from .helpers import arun, assert_running_and_beating

pytestmark = [pytest.mark.vm, pytest.mark.netns]

GUEST_IP = NetLab.guest_ip(1)


@pytest.fixture(scope="module")
def debian_image() -> DebianImage:
    return build_debian_image()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, guest_image: Any) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("netns")
    c = LocalCluster(root / "cluster", ("host-a", "host-b"), netns=True)
    try:
        c.setup()
        c.add_user("alice", ["owner", "operator"], tenant="acme")
        c.add_user("sam", ["security-admin", "auditor"])
        c.start_agents()
        yield c
    finally:
        c.stop()
    assert c.netlab is not None and not set(c.netlab.namespaces) & existing_namespaces()


def _ssh(lab: LocalCluster, image: DebianImage, cmd: str) -> str:
    assert lab.netlab is not None
    res = guest_ssh(image, GUEST_IP, 22, cmd, timeout=60, netns=lab.netlab.ns("client"))
    assert res.ok, res.stderr
    return res.stdout.strip()


def _migrate(lab: LocalCluster, src: str, dst: str, options: dict[str, Any]) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        a, b = await lab.client(src, "alice"), await lab.client(dst, "alice")
        try:
            res = await a.call("migrate", {"vm": "web", "to": dst, "options": options},
                               timeout=600)  # fmt: skip
            await assert_running_and_beating(b, "web")
            return res
        finally:
            await a.close()
            await b.close()

    return arun(go())


def _ticks_after(probe: ClientProbe, seen: int, more: int = 10, timeout_s: float = 60.0) -> int:
    """Wait until the guest's ssh loop printed `more` ticks past `seen`; the count then.

    A session that stalled for good fails here (with the count) instead of passing on a
    fixed sleep; the guest's pace (TCG, a loaded host) changes only how long this waits.
    """
    deadline = time.monotonic() + timeout_s
    while probe.report.ssh_lines < seen + more and time.monotonic() < deadline:
        time.sleep(0.1)
    assert probe.report.ssh_lines >= seen + more, (seen, probe.report)
    return probe.report.ssh_lines


def test_clients_stay_connected_through_pre_and_post_copy(
    lab: LocalCluster, debian_image: DebianImage, tmp_path: Path
) -> None:
    assert lab.netlab is not None
    client_ns = lab.netlab.ns("client")
    disk = create_overlay(debian_image, tmp_path / "shared" / "web.qcow2")
    definition = debian_definition("web", debian_image, disk, ssh_port=2222,
                                   guest_net=(GUEST_BRIDGE, f"{GUEST_IP}/24"))  # fmt: skip
    definition["tenant"] = "acme"

    async def boot() -> None:
        a = await lab.client("host-a", "alice")
        try:
            await a.call("vm.define", {"definition": definition})
            await a.call("vm.start", {"name": "web", "policy": lab.signed_policy("alice", "web")},
                         timeout=300)  # fmt: skip
        finally:
            await a.close()

    arun(boot())
    assert wait_for_ssh(debian_image, GUEST_IP, 22, netns=client_ns).ok
    _ssh(lab, debian_image, ECHO_SERVER % ECHO_PORT)
    time.sleep(0.5)
    probe = ClientProbe(client_ns, GUEST_IP, ssh_argv(debian_image, GUEST_IP, 22, SSH_LOOP,
                                                      client_ns))  # fmt: skip
    probe.start()
    ticks: list[int] = []
    try:
        ticks.append(_ticks_after(probe, 0))
        out = _migrate(lab, "host-a", "host-b", {})
        ticks.append(_ticks_after(probe, ticks[-1]))
        # capped, as the other post-copy tests are: an idle guest's first pass must not finish
        # before the switch is asked for (it then completes as pre-copy)
        back = _migrate(lab, "host-b", "host-a", {"mode": "postcopy", "postcopy_after_rounds": 1,
                                                  "max_bandwidth_mibps": 128})  # fmt: skip
        ticks.append(_ticks_after(probe, ticks[-1]))
    finally:
        report = probe.stop()
    assert out["status"] == back["status"] == "completed" and back["mode"] == "postcopy"
    doc = report.to_json()
    print(json.dumps(doc))  # the longest stall each client saw, for the record
    assert doc["client_session_survived"], doc
    assert doc["client_bytes_lost"] == 0 and report.echo_bytes_sent > 100 * 1024, doc
    # the ssh loop ticked before, between and after both migrations, and skipped no tick
    assert ticks[0] > 0 and ticks[2] > ticks[1] > ticks[0] and report.errors == [], (ticks, doc)
    assert doc["client_max_stall_ms"] > 0


def _dropped(lab: LocalCluster, host: str) -> int:
    assert lab.netlab is not None
    out = subprocess.run(
        ["ip", "netns", "exec", lab.netlab.ns(host), "nft", "-j", "list", "counters"],
        capture_output=True, text=True, check=True, timeout=20,
    )  # fmt: skip
    items = json.loads(out.stdout)["nftables"]
    return sum(int(i["counter"]["packets"]) for i in items
               if "counter" in i and i["counter"]["name"] == "dropped")  # fmt: skip


def _try(netns: str, ip: str, port: int) -> str:
    try:
        connect_in(netns, ip, port, timeout=1.5).close()
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return type(e).__name__
    return "connected"


def test_the_kernel_refuses_other_segments_before_the_guard_sees_them(lab: LocalCluster) -> None:
    assert lab.netlab is not None
    net = lab.netlab
    before_guard = arun(lab.guard_counters("host-a", "sam"))
    before_drop = _dropped(lab, "host-a")
    control, data = net.mgmt_ip("host-a"), net.migration_ip("host-a")
    attempts = {
        "client to data": _try(net.ns("client"), data, NETNS_DATA_PORT),
        "client to control": _try(net.ns("client"), control, NETNS_CONTROL_PORT),
        "admin to data": _try(net.ns("admin"), data, NETNS_DATA_PORT),
        "host-b's management address to data": _try_from(
            net, "host-b", net.mgmt_ip("host-b"), data, NETNS_DATA_PORT
        ),
    }
    assert set(attempts.values()) == {"timeout"}, attempts  # dropped, not even refused
    # the segments that should reach the ports still do
    assert _try(net.ns("admin"), control, NETNS_CONTROL_PORT) == "connected"
    assert _try_from(net, "host-b", net.migration_ip("host-b"), data, NETNS_DATA_PORT) == (
        "connected"
    )
    assert _dropped(lab, "host-a") >= before_drop + 4
    after_guard = arun(lab.guard_counters("host-a", "sam"))
    assert after_guard.get("network", 0) == before_guard.get("network", 0), (
        before_guard,
        after_guard,
    )


def _try_from(net: NetLab, host: str, source_ip: str, ip: str, port: int) -> str:
    """A connection from ``host``'s namespace with a chosen source address."""
    import threading

    from trustmig.netns.enter import enter

    out: list[str] = []

    def run() -> None:
        try:
            enter(net.ns(host))
            s = socket.socket()
            s.settimeout(1.5)
            s.bind((source_ip, 0))
            s.connect((ip, port))
            s.close()
            out.append("connected")
        except TimeoutError:
            out.append("timeout")
        except OSError as e:
            out.append(type(e).__name__)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    return out[0] if out else "hung"


def test_namespaces_are_listed_in_the_cluster_summary(lab: LocalCluster) -> None:
    assert lab.netlab is not None
    doc = json.loads((lab.root / "cluster.json").read_text())
    assert doc["netns"]["tag"] == lab.netlab.tag
    assert asyncio.run(_ping(lab)) == {"host-a": True, "host-b": True}


async def _ping(lab: LocalCluster) -> dict[str, bool]:
    out = {}
    for h in ("host-a", "host-b"):
        c = await lab.client(h, "alice")
        try:
            out[h] = bool(await c.call("ping"))
        finally:
            await c.close()
    return out


def _secret_guest(image: Any, name: str) -> Any:
    from trustmig.lab.targets import guest_spec

    return guest_spec(name, image)


def test_a_wiretap_on_the_migration_segment_reads_qemu_but_not_trustmig(
    lab: LocalCluster, guest_image: Any, tmp_path: Path
) -> None:
    """The attacker taps host-b's migration link at the switch (a raw packet socket, nothing
    sent): QEMU's own migration between the namespaced hosts shows the guest's secret marker;
    trustmig's, on the same wire, shows none."""
    from trustmig.bench.direct import DirectPath, run_direct
    from trustmig.hypervisor.accel import choose_accel
    from trustmig.hypervisor.migration import MigrationOptions
    from trustmig.hypervisor.spec import DEFAULT_SECRET
    from trustmig.lab.proxy import Sniffer
    from trustmig.lab.segment import SegmentTap
    from trustmig.netns.enter import exec_argv

    assert lab.netlab is not None
    net = lab.netlab
    port = net.switch_port(net.hosts.index("host-b") + 1, "mig")
    secret = DEFAULT_SECRET.encode()

    plain = Sniffer(secret)
    tap = SegmentTap(net.ns("switch"), port, plain).start()
    try:
        launch_a, launch_b = (
            tuple(exec_argv(net.ns("host-a"), [])),
            tuple(exec_argv(net.ns("host-b"), [])),
        )
        path = DirectPath(launch_a, launch_b, net.migration_ip("host-b"))
        rec = arun(run_direct("plain", _secret_guest(guest_image, "tapped"), guest_image,
                              choose_accel("auto"), tmp_path / "plain", MigrationOptions(),
                              None, path))  # fmt: skip
    finally:
        tap.stop()
    assert rec["status"] == "completed", rec
    assert tap.dropped == 0 and tap.error is None, (
        tap.dropped,
        tap.error,
    )  # else it proves nothing
    assert plain.hits > 0 and plain.bytes_seen > 32 << 20, (plain.hits, plain.bytes_seen)

    sealed = Sniffer(secret)
    tap = SegmentTap(net.ns("switch"), port, sealed).start()
    try:

        async def go() -> dict[str, Any]:
            a = await lab.client("host-a", "alice")
            try:
                spec = _secret_guest(guest_image, "sealed").model_dump(mode="json")
                await a.call("vm.start", {"spec": spec,
                                          "policy": lab.signed_policy("alice", "sealed")},
                             timeout=300)  # fmt: skip
                res = await a.call("migrate", {"vm": "sealed", "to": "host-b", "options": {}},
                                   timeout=600)  # fmt: skip
                b = await lab.client("host-b", "alice")
                try:
                    await b.call("vm.stop", {"name": "sealed"}, timeout=60)
                finally:
                    await b.close()
                return res
            finally:
                await a.close()

        res = arun(go())
    finally:
        tap.stop()
    assert res["status"] == "completed" and tap.dropped == 0 and tap.error is None, (
        res["status"],
        tap.dropped,
        tap.error,
    )
    assert sealed.bytes_seen > 32 << 20 and sealed.hits == 0, (sealed.hits, sealed.bytes_seen)


def test_a_flood_from_the_migration_segment_does_not_stop_a_migration(
    lab: LocalCluster, guest_image: Any
) -> None:
    """A stranger on the migration network (no certificate) hammers host-b's data port while a
    VM migrates there: the migration completes and the guard counts the refusals."""
    import threading

    assert lab.netlab is not None
    net = lab.netlab
    stop = threading.Event()
    tried = [0]

    def flood() -> None:
        from trustmig.netns.enter import enter

        enter(net.ns("attacker"))
        while not stop.is_set():
            try:
                s = socket.create_connection((net.migration_ip("host-b"), NETNS_DATA_PORT), 1)
                s.sendall(b"\x16\x03\x01 not a handshake " * 8)
                s.close()
            except OSError:
                pass
            tried[0] += 1

    before = arun(lab.guard_counters("host-b", "sam"))
    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:

        async def go() -> dict[str, Any]:
            a = await lab.client("host-a", "alice")
            try:
                spec = _secret_guest(guest_image, "flooded").model_dump(mode="json")
                await a.call("vm.start", {"spec": spec,
                                          "policy": lab.signed_policy("alice", "flooded")},
                             timeout=300)  # fmt: skip
                res = await a.call("migrate", {"vm": "flooded", "to": "host-b", "options": {}},
                                   timeout=600)  # fmt: skip
                b = await lab.client("host-b", "alice")
                try:
                    await assert_running_and_beating(b, "flooded")
                    await b.call("vm.stop", {"name": "flooded"}, timeout=60)
                finally:
                    await b.close()
                return res
            finally:
                await a.close()

        res = arun(go())
    finally:
        stop.set()
        t.join(10)
    after = arun(lab.guard_counters("host-b", "sam"))
    assert res["status"] == "completed"
    refused = sum(after.get(k, 0) - before.get(k, 0) for k in after if k != "accept")
    assert tried[0] > 50 and refused > 0, (tried[0], before, after)


def test_a_man_in_the_middle_on_the_segment_rewrites_qemu_but_not_trustmig(
    lab: LocalCluster, guest_image: Any, tmp_path: Path
) -> None:
    """The attacker has won the ARP race on the migration network (host-a's neighbour entry
    for host-b points at it) and relays host-a's connections to host-b through its own proxy:
    QEMU's migration arrives with the guest's markers rewritten; trustmig's, blindly tampered
    (the marker is not visible in ciphertext), fails closed and the guest stays on host-a."""
    from trustmig.bench.direct import DirectPath, run_direct
    from trustmig.hypervisor.accel import choose_accel
    from trustmig.hypervisor.migration import MigrationOptions
    from trustmig.hypervisor.spec import DEFAULT_SECRET
    from trustmig.lab.proxy import BlindTamper, Rewriter
    from trustmig.lab.segment import SegmentMitm
    from trustmig.netns.enter import exec_argv

    assert lab.netlab is not None
    net = lab.netlab
    secret = DEFAULT_SECRET.encode()
    forged = b"X" * len(secret)
    victim = net.migration_ip("host-b")

    def mitm(port: int, tap: Any) -> SegmentMitm:
        return SegmentMitm(net.ns("host-a"), "mig0", net.ns("attacker"), net.attacker_ip,
                           victim, port, tap)  # fmt: skip

    rewriter = Rewriter(secret, forged)
    with mitm(7300, rewriter) as m:
        launch_a, launch_b = (
            tuple(exec_argv(net.ns("host-a"), [])),
            tuple(exec_argv(net.ns("host-b"), [])),
        )
        path = DirectPath(launch_a, launch_b, victim, port=7300)
        rec = arun(run_direct("plain", _secret_guest(guest_image, "mitm-plain"), guest_image,
                              choose_accel("auto"), tmp_path / "plain", MigrationOptions(),
                              None, path))  # fmt: skip
        assert m.proxy is not None and m.proxy.connections >= 1
    # QEMU loaded the forged memory without a word; only the guest's own check sees it
    assert rewriter.replaced > 0 and rec["integrity_ok"] is False, (rec.get("error"), rewriter)
    after = rec["integrity"]["after"]
    assert after["marker_ok"] < after["marker_total"], after

    tamper = BlindTamper(secret, forged, at_offset=8 << 20)

    async def go() -> tuple[str, dict[str, Any]]:
        a = await lab.client("host-a", "alice")
        try:
            spec = _secret_guest(guest_image, "mitm-sealed").model_dump(mode="json")
            await a.call("vm.start", {"spec": spec,
                                      "policy": lab.signed_policy("alice", "mitm-sealed")},
                         timeout=300)  # fmt: skip
            with mitm(NETNS_DATA_PORT, tamper):
                try:
                    await a.call("migrate", {"vm": "mitm-sealed", "to": "host-b",
                                             "options": {}}, timeout=600)  # fmt: skip
                    err = ""
                except Exception as e:  # noqa: BLE001 - the expected refusal
                    err = str(e)
            await assert_running_and_beating(a, "mitm-sealed")
            check = await a.call("vm.check", {"name": "mitm-sealed"}, timeout=120)
            await a.call("vm.stop", {"name": "mitm-sealed"}, timeout=60)
            return err, check
        finally:
            await a.close()

    err, check = arun(go())
    assert tamper.replaced == 0 and tamper.tampered > 0, (tamper.replaced, tamper.tampered)
    assert err, "the tampered migration must not complete"
    assert check["bad_pages"] == 0 and check["marker_ok"] == check["marker_total"], check
