"""The tenant rules themselves, in the kernel: a port of another tenant wired onto a tenant's
bridge (a mistake, or an attacker's tap) reaches nobody there, while the tenant's own ports reach
each other. Real namespaces, veth pairs and nftables; no guest needed."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from trustmig.agent.tenant_net import render_tenant_nft

pytestmark = pytest.mark.netns


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=20, check=check)


@pytest.fixture
def wired() -> Iterator[dict[str, str]]:
    """Namespace ``host`` with bridge tvb101 and three ports, each the far end of a veth in its
    own namespace: two of tenant 101, one named as tenant 102's."""
    tag = f"tr{os.getpid() % 100000}"
    host = f"{tag}-host"
    ends = {"own1": ("tv101_a1", "10.99.7.1"), "own2": ("tv101_a2", "10.99.7.2"),
            "foreign": ("tv102_e1", "10.99.7.3")}  # fmt: skip
    made = [host]
    try:
        sh("ip", "netns", "add", host)
        sh("ip", "-n", host, "link", "add", "tvb101", "type", "bridge")
        sh("ip", "-n", host, "link", "set", "tvb101", "up")
        for name, (port, ip) in ends.items():
            ns = f"{tag}-{name}"
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", host, "link", "add", port, "type", "veth", "peer", "name", "eth0",
               "netns", ns)  # fmt: skip
            sh("ip", "-n", host, "link", "set", port, "master", "tvb101", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        rules = render_tenant_nft({"acme": 101, "evil": 102}, [], 4789, vxlan=False)
        subprocess.run(["ip", "netns", "exec", host, "nft", "-f", "-"], input=rules, text=True,
                       check=True, timeout=20)  # fmt: skip
        yield {name: ip for name, (_p, ip) in ends.items()} | {"tag": tag}
    finally:
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)


def reaches(tag: str, src: str, ip: str) -> bool:
    return sh("ip", "netns", "exec", f"{tag}-{src}", "busybox", "ping", "-c", "1", "-W", "1", ip,
              check=False).returncode == 0  # fmt: skip


def test_only_ports_of_one_tenant_reach_each_other_on_its_bridge(wired: dict[str, str]) -> None:
    tag = wired["tag"]
    assert reaches(tag, "own1", wired["own2"])
    assert not reaches(tag, "own1", wired["foreign"])
    assert not reaches(tag, "foreign", wired["own2"])


def test_the_rules_replace_themselves() -> None:
    text = render_tenant_nft({"acme": 101}, ["10.77.2.12"], 4789, vxlan=True)
    assert text.count("delete table") == 2
    assert 'iifname "tv101_*" oifname != "tv101_*"' in text
    assert "udp dport 4789 ip saddr != { 10.77.2.12 }" in text
    assert 'iifname "tvb101" oifname != "tvb101"' in text


FABRIC = """
import json, subprocess
from trustmig.agent.tenant_net import TenantNetworks
from trustmig.config import HostConfig
cfg = HostConfig.model_validate({"name": "h",
    "tenant_networks": {"vnis": {"acme": 101}, "underlay": "10.99.8.1"},
    "peers": {"p1": {"control": "127.0.0.1:1", "underlay": "10.99.8.2"},
              "p2": {"control": "127.0.0.1:2", "underlay": "10.99.8.3"}}})
t = TenantNetworks(cfg)
def state():
    fdb = subprocess.run(["bridge", "fdb", "show", "dev", "tv101_vx"], capture_output=True,
                         text=True).stdout
    rules = subprocess.run(["nft", "list", "table", "inet", "trustmig_tenants"],
                           capture_output=True, text=True).stdout
    return {"fdb": [p for p in ("10.99.8.2", "10.99.8.3") if "dst " + p in fdb],
            "rules": [p for p in ("10.99.8.2", "10.99.8.3") if p in rules]}
t.apply()
out = {"start": state()}
out["changed"] = t.sync({"p1"})
out["quarantined"] = state()
out["again"] = t.sync({"p1"})
t.sync(set())
out["cleared"] = state()
print(json.dumps(out))
"""


def test_a_quarantined_peer_leaves_the_tenant_fabric_and_rejoins_when_cleared() -> None:
    import json
    import sys

    ns = f"tf{os.getpid() % 100000}"
    sh("ip", "netns", "add", ns)
    try:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", FABRIC],
                             capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        r = json.loads(out.stdout)
    finally:
        sh("ip", "netns", "del", ns, check=False)
    both = ["10.99.8.2", "10.99.8.3"]
    assert r["start"] == {"fdb": both, "rules": both}
    assert r["changed"] is True and r["again"] is False
    assert r["quarantined"] == {"fdb": ["10.99.8.3"], "rules": ["10.99.8.3"]}
    assert r["cleared"] == {"fdb": both, "rules": both}
