"""nftables rendering: syntax accepted by ``nft -c`` and enforcement inside network namespaces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustmig.guard import GuardRules, InvalidRulesError, render_nft
from trustmig.guard.nft import nft_rate

HAVE_NFT = shutil.which("nft") is not None
HAVE_IP = shutil.which("ip") is not None
NFT = shutil.which("nft") or "nft"
IP = shutil.which("ip") or "ip"
needs_root_nft = pytest.mark.skipif(
    not HAVE_NFT or os.geteuid() != 0, reason="nft -c needs the nft binary and root (netlink)"
)


def test_rendered_ruleset_contents() -> None:
    text = render_nft(
        GuardRules(allowed_networks=["10.231.1.0/24", "fd00::/8"], max_conn_rate_per_peer=20),
        control_port=7443,
        data_port=7444,
    )
    assert "table inet trustmig {" in text
    assert "elements = { 10.231.1.0/24 }" in text and "elements = { fd00::/8 }" in text
    assert "ct state established,related accept" in text
    assert "limit rate 20/second burst 40 packets" in text
    assert 'tcp dport { 7443, 7444 } counter name "dropped" drop' in text


def test_fractional_rates_use_longer_units() -> None:
    assert nft_rate(20.0) == ("20/second", 40)
    assert nft_rate(0.5) == ("30/minute", 60)
    assert nft_rate(2.5) == ("150/minute", 300)


def test_bad_ports_and_table_names_refused() -> None:
    with pytest.raises(InvalidRulesError, match="data_port is 70000"):
        render_nft(GuardRules(), control_port=7000, data_port=70000)
    with pytest.raises(InvalidRulesError, match="table name"):
        render_nft(GuardRules(), control_port=7000, data_port=7001, table="bad name;")


@needs_root_nft
@pytest.mark.parametrize(
    "networks", [["127.0.0.0/8"], ["10.0.0.0/8", "::1/128", "fd00::/8"], ["::/0"]]
)
def test_nft_accepts_the_syntax(tmp_path: Path, networks: list[str]) -> None:
    path = tmp_path / "guard.nft"
    path.write_text(
        render_nft(
            GuardRules(allowed_networks=networks, max_conn_rate_per_peer=0.5),
            control_port=7000,
            data_port=7001,
            table="tm_check",
        )
    )
    res = subprocess.run([NFT, "-c", "-f", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------- netns
LISTENER = r"""
import socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
s.settimeout(20)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hi")
    c.close()
"""
CLIENT = r"""
import socket, sys
s = socket.socket()
s.settimeout(1.5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("CONNECTED", s.recv(10).decode())
except OSError as e:
    print("BLOCKED", type(e).__name__)
"""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=20)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {res.stderr.strip()}")
    return res


@pytest.fixture()
def three_hosts() -> Iterator[dict[str, str]]:
    """host (guarded) <-veth-> peer (10.231.1.0/24) and host <-veth-> attacker (10.231.2.0/24)."""
    if not HAVE_IP or not HAVE_NFT or os.geteuid() != 0:
        pytest.skip("needs root, `ip netns` and nft to create namespaces")
    probe = subprocess.run([IP, "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"`ip netns` unavailable: {probe.stderr.strip()}")
    tag = f"{os.getpid() % 100000}"
    ns = {"host": f"tmg-h{tag}", "peer": f"tmg-p{tag}", "attacker": f"tmg-a{tag}"}
    created: list[str] = []
    try:
        for name in ns.values():
            _run(IP, "netns", "add", name)
            created.append(name)
            _run(IP, "-n", name, "link", "set", "lo", "up")
        for i, (role, hv, pv) in enumerate(
            (("peer", f"gh1{tag}", f"gp1{tag}"), ("attacker", f"gh2{tag}", f"ga2{tag}")), start=1
        ):
            _run(
                IP,
                "link",
                "add",
                hv,
                "netns",
                ns["host"],
                "type",
                "veth",
                "peer",
                "name",
                pv,
                "netns",
                ns[role],
            )
            _run(IP, "-n", ns["host"], "addr", "add", f"10.231.{i}.1/24", "dev", hv)
            _run(IP, "-n", ns[role], "addr", "add", f"10.231.{i}.2/24", "dev", pv)
            _run(IP, "-n", ns["host"], "link", "set", hv, "up")
            _run(IP, "-n", ns[role], "link", "set", pv, "up")
        yield ns
    finally:
        for name in created:
            subprocess.run([IP, "netns", "del", name], capture_output=True)


@pytest.mark.netns
def test_rules_enforced_in_namespace(three_hosts: dict[str, str], tmp_path: Path) -> None:
    ns = three_hosts
    data_port = 7444
    script = tmp_path / "guard.nft"
    script.write_text(
        render_nft(
            GuardRules(allowed_networks=["10.231.1.0/24"]), control_port=7443, data_port=data_port
        )
    )
    _run(IP, "netns", "exec", ns["host"], NFT, "-f", str(script))
    listener = subprocess.Popen(
        [IP, "netns", "exec", ns["host"], sys.executable, "-c", LISTENER, str(data_port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"

        def client(role: str, server_ip: str) -> str:
            res = _run(
                IP,
                "netns",
                "exec",
                ns[role],
                sys.executable,
                "-c",
                CLIENT,
                server_ip,
                str(data_port),
            )
            return res.stdout.strip()

        assert client("peer", "10.231.1.1") == "CONNECTED hi"
        assert client("attacker", "10.231.2.1").startswith("BLOCKED")
    finally:
        listener.kill()
        listener.wait(timeout=10)

    listing = json.loads(
        _run(IP, "netns", "exec", ns["host"], NFT, "-j", "list", "ruleset").stdout
    )["nftables"]
    counters = {c["counter"]["name"]: c["counter"] for c in listing if "counter" in c}
    assert counters["dropped"]["packets"] >= 1  # the attacker's SYN (and its retransmits)
    assert counters["accepted_new"]["packets"] == 1  # exactly the peer's one connection
    ct = shutil.which("conntrack")
    if ct is not None:
        table = _run(IP, "netns", "exec", ns["host"], ct, "-L", check=False)
        assert "src=10.231.1.2" in table.stdout
