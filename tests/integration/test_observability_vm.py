"""The operator's view of a live migration: ``/metrics`` scraped during and after it shows the
counters moved by exactly that migration, and the dashboard in headless Chromium shows it
appear, progress and complete, next to a quarantined host (the screenshot is kept)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trustmig.pki.tls import client_context
from trustmig.pki.trust import TrustBundle

from .browser import Browser
from .helpers import arun, spec, start_vm

pytestmark = [pytest.mark.vm, pytest.mark.tpm, pytest.mark.browser]
HOSTS = ("host-a", "host-b", "host-l")
METRICS = 'metrics = {listen = "127.0.0.1:0"}'
ARTIFACTS = Path(os.environ.get("TRUSTMIG_TEST_ARTIFACTS", "test-artifacts"))
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(c: Any, host: str, user: str) -> Samples:
    """``/metrics`` of ``host`` over mutual TLS with ``user``'s certificate, parsed by
    prometheus_client's own parser."""
    creds = c.user_credentials(user)
    ctx = client_context(creds, TrustBundle.load(creds.ca_path, creds.crl_path))
    ip, port = c.hosts[host].info["metrics"].rsplit(":", 1)
    conn = http.client.HTTPSConnection(ip, int(port), context=ctx, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, body
    finally:
        conn.close()
    out: Samples = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape_without_certificate(c: Any, host: str) -> str:
    """What a scraper without a cluster certificate gets: the TLS handshake refused."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(c.user_credentials("cleo").ca_path))
    ctx.check_hostname = False
    ip, port = c.hosts[host].info["metrics"].rsplit(":", 1)
    conn = http.client.HTTPSConnection(ip, int(port), context=ctx, timeout=10)
    try:
        conn.request("GET", "/metrics")
        return f"HTTP {conn.getresponse().status}"
    except (ssl.SSLError, ConnectionError) as e:
        return f"refused: {type(e).__name__}"
    finally:
        conn.close()


def value(s: Samples, name: str, **labels: str) -> float:
    return s.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples) -> dict[str, float]:
    """Every sample that changed, as name{labels} -> difference (created stamps aside)."""
    out = {}
    for key in set(before) | set(after):
        if key[0].endswith("_created"):
            continue
        d = after.get(key, 0.0) - before.get(key, 0.0)
        if d:
            out[key[0] + json.dumps(dict(key[1]), sort_keys=True)] = d
    return out


def state(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url + "api/state", timeout=10) as r:
        return str(r.read().decode()[:3000])


def start_dashboard(c: Any, tmp: Path) -> tuple[subprocess.Popen[str], str]:
    url_file = tmp / "dashboard.url"
    env = {**os.environ, "TRUSTMIG_DASHBOARD_URL_FILE": str(url_file)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustmig.cli.main", "dashboard", "--agent",
         c.hosts["host-a"].control, "--credentials", str(c.users["cleo"]),
         "--listen", "127.0.0.1:0", "--interval", "0.5"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not url_file.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.2)
    return proc, url_file.read_text()


def test_metrics_and_the_dashboard_follow_a_live_migration(
    make_cluster: Any, tmp_path: Path
) -> None:
    liar = {"host-l": "trustmig.lab.liar_agent"}
    metrics = {"host-a": METRICS, "host-b": METRICS}
    c = make_cluster(hosts=HOSTS, agent_module=liar, extra_config=metrics, defer_start=True)
    c.add_user("cleo", ["cluster-admin", "auditor"])
    c.start_agents()

    async def prepare() -> None:
        a = await c.client("host-a", "alice")
        cleo = await c.client("host-a", "cleo")
        try:
            await start_vm(a, spec("vm1", memory=160, workload=80, rate=8.0), c,
                           allowed_roles=["operator", "cluster-admin"])  # fmt: skip
            await cleo.call("cluster.loads", timeout=60)  # host-l lies and is quarantined
        finally:
            await a.close()
            await cleo.close()

    arun(prepare())
    dash, url = start_dashboard(c, tmp_path)
    browser = Browser(tmp_path / "chromium")
    try:
        browser.open(url)
        browser.until("document.querySelector('#hosts tr[data-host=\"host-l\"]')"
                      "?.dataset.quarantined === 'yes'", timeout=30)  # fmt: skip
        browser.until("document.querySelector('#vms tr[data-vm=\"vm1\"]')?.dataset.host"
                      " === 'host-a'")  # fmt: skip
        before = {h: scrape(c, h, "cleo") for h in ("host-a", "host-b")}
        anonymous = scrape_without_certificate(c, "host-a")

        async def migrate() -> dict[str, Any]:
            a = await c.client("host-a", "alice")
            try:
                opts = {"max_bandwidth_mibps": 16}
                return await a.call("migrate", {"vm": "vm1", "to": "host-b", "options": opts},
                                    timeout=600)  # fmt: skip
            finally:
                await a.close()

        loop = asyncio.new_event_loop()
        try:
            running = loop.run_in_executor(None, lambda: asyncio.run(migrate()))
            row = "document.querySelector('#live-migrations tr[data-vm=\"vm1\"]')"
            try:
                browser.until(f"!!{row}?.querySelector('[data-ram-percent]')", timeout=60)
            except AssertionError as e:
                raise AssertionError(f"{e}; the dashboard's state: {state(url)}") from None
            during = scrape(c, "host-a", "cleo")
            browser.screenshot(ARTIFACTS / "dashboard-during-migration.png")
            seen = set()
            deadline = time.monotonic() + 60
            while not running.done() and time.monotonic() < deadline:
                pct = browser.evaluate(f"{row}?.querySelector('[data-ram-percent]')"
                                       "?.dataset.ramPercent")  # fmt: skip
                if pct is not None:
                    seen.add(float(pct))
                time.sleep(0.3)
            result = loop.run_until_complete(running)
        finally:
            loop.close()
        browser.until("document.querySelector('#history tr[data-vm=\"vm1\"][data-role=\"source\"]')"
                      "?.dataset.state === 'completed'", timeout=30)  # fmt: skip
        browser.until("document.querySelector('#vms tr[data-vm=\"vm1\"]')?.dataset.host"
                      " === 'host-b'", timeout=30)  # fmt: skip
        browser.until("!document.querySelector('#live-migrations tr[data-vm=\"vm1\"]')")
        shot = browser.screenshot(ARTIFACTS / "dashboard-live-migration.png")
        pause = "trustmig_migration_guest_pause_seconds_count"
        deadline = time.monotonic() + 15  # measured once the destination's guest beats again
        while not value(scrape(c, "host-b", "cleo"), pause, channel="secure", mode="precopy"):
            assert time.monotonic() < deadline, "the destination never measured the felt pause"
            time.sleep(0.5)
        after = {h: scrape(c, h, "cleo") for h in ("host-a", "host-b")}
        audit_seen = browser.evaluate("document.querySelector('#audit tr[data-host=\"host-a\"]')"
                                      "?.dataset.audit")  # fmt: skip
    finally:
        browser.close()
        dash.terminate()
        dash.wait(timeout=30)

    assert result["status"] == "completed"
    assert anonymous.startswith("refused"), anonymous
    assert len(seen) >= 2 and max(seen) > min(seen), f"progress never moved: {sorted(seen)}"
    assert shot.stat().st_size > 10_000
    assert audit_seen == "intact"
    # during: one outgoing migration in progress, none finished yet
    assert value(during, "trustmig_migrations_in_progress", role="source") == 1
    # after: exactly this migration, once on each side, with its bytes and times
    lab = {"channel": "secure", "mode": "precopy"}
    src, dst = moved(before["host-a"], after["host-a"]), moved(before["host-b"], after["host-b"])
    done = 'trustmig_migrations_total{"channel": "secure", "mode": "precopy", "outcome": '
    assert src[done + '"completed", "role": "source"}'] == 1
    assert dst[done + '"committed", "role": "destination"}'] == 1
    assert not [
        k for k in src if k.startswith("trustmig_migrations_total") and "completed" not in k
    ]
    sent = "trustmig_migration_transferred_bytes_total"
    sent_now = value(after["host-a"], sent, channel="secure")
    assert sent_now - value(before["host-a"], sent, channel="secure") == result["bytes_transferred"]
    assert src["trustmig_migration_downtime_seconds_count" + json.dumps(lab, sort_keys=True)] == 1
    assert src["trustmig_channel_handshake_seconds_count{}"] == 1

    def total(d: dict[str, float], prefix: str, *parts: str) -> float:
        return sum(v for k, v in d.items() if k.startswith(prefix) and all(p in k for p in parts))

    assert total(src, "trustmig_policy_decisions_total", '"migrate-out"', '"allow"') == 1
    assert total(dst, "trustmig_policy_decisions_total", '"migrate-in"', '"allow"') == 1
    assert total(src, "trustmig_attestation_verdicts_total", '"verified"') >= 1
    assert total(src, "trustmig_attestation_verdicts_total", '"refused"') == 0
    assert (
        dst["trustmig_migration_guest_pause_seconds_count" + json.dumps(lab, sort_keys=True)] == 1
    )
    assert value(after["host-a"], "trustmig_migrations_in_progress", role="source") == 0
    assert value(after["host-b"], "trustmig_vms", state="running") == 1
    assert value(after["host-a"], "trustmig_quarantined_hosts") == 1
