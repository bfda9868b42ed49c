"""`trustmig bench migrate`: the same guest migrated over each channel, interleaved, medians.

Channels compared (see docs/benchmarks.md):

* ``plain``    QEMU direct TCP, no agents: the hypervisor's own ceiling on this host;
* ``secure``   trustmig's product path through two agent processes;
* ``qemu-tls`` QEMU's native TLS with certificates from the same cluster CA;
* ``ipsec``    (``--netns``) QEMU direct TCP through the hosts' IKEv2/ESP tunnel (strongSwan);
* ``secure+ipsec`` (``--netns``) trustmig's path inside that tunnel.

With ``--netns`` the two hosts are network namespaces and every channel crosses their migration
network (QEMUs and agents run inside the namespaces); the IPsec daemons' CPU counts for their side.

Every run boots a fresh source and destination so no run inherits warm memory from the previous
one, and channels are interleaved inside each repetition (plain, secure, qemu-tls, plain, ...) so
that noise from other work on the host hits every channel alike. Only one VM pair exists at a
time. QEMUs are stopped by their own PIDs and the agents by theirs, even when a run fails.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmig.agent.local_cluster import LocalCluster
from trustmig.bench.cipher import measure_cipher_cost
from trustmig.bench.config import IPSEC_CHANNELS, BenchConfig, rate_key
from trustmig.bench.direct import DirectPath, QemuTls, run_direct
from trustmig.bench.errors import BenchError
from trustmig.bench.secure import DEST, SOURCE, TENANT, USER, USER_ROLES, run_secure
from trustmig.bench.stats import cipher_overhead, summarize
from trustmig.hypervisor.accel import choose_accel
from trustmig.hypervisor.image import GuestImage, build_image
from trustmig.hypervisor.migration import MigrationOptions
from trustmig.hypervisor.spec import VMSpec
from trustmig.netns.enter import exec_argv
from trustmig.netns.ipsec import IpsecTunnel, inner_ip
from trustmig.pki.authority import Credentials
from trustmig.pki.qemu_tls import write_qemu_tls_dir

BENCH_MAX_PER_VM_PER_HOUR = 1_000_000


@dataclass(frozen=True)
class RunPlan:
    """One planned run: which channel, dirtying rate, repetition and copy mode."""

    index: int
    channel: str
    dirty_rate: float
    rep: int
    mode: str

    @property
    def label(self) -> str:
        return f"{self.channel} dirty={rate_key(self.dirty_rate)} {self.mode} #{self.rep + 1}"


#: Called before each run (done, total, label) and once at the end (total, total, "done").
ProgressFn = Callable[[int, int, str], None]
RunFn = Callable[[dict[str, Any]], None]


def plan_runs(cfg: BenchConfig) -> list[RunPlan]:
    """Repetition-major order, channels innermost: noise is spread over every channel."""
    plans: list[RunPlan] = []
    for rep in range(cfg.repeat):
        for rate in cfg.dirty_rates:
            for mode in cfg.modes:
                for ch in cfg.channels:
                    plans.append(RunPlan(len(plans), ch, rate, rep, mode))
    return plans


def guest_spec(cfg: BenchConfig, dirty_rate: float, image: GuestImage) -> VMSpec:
    spec = VMSpec.model_validate(
        {
            "name": cfg.vm_name,
            "memory_mib": cfg.memory_mib,
            "tenant": TENANT,
            "image_key": image.key,
            "workload": {"mem_mib": cfg.fill, "dirty_rate": dirty_rate},
        }
    )
    try:
        spec.check_fits()
    except ValueError as e:
        raise BenchError(str(e)) from None
    return spec


def migration_options(cfg: BenchConfig, mode: str) -> MigrationOptions:
    """The same migration parameters for every channel (bandwidth unlimited, same downtime)."""
    return MigrationOptions.model_validate(
        {
            "mode": "postcopy" if mode == "postcopy" else "precopy",
            "postcopy_after_rounds": cfg.postcopy_after_rounds,
            "postcopy_preempt": cfg.postcopy_preempt,
            "prealloc_destination": cfg.prealloc_destination,
            "timeout_s": cfg.timeout_s,
        }
    )


def _prepare_cluster(root: Path, with_agents: bool, netns: bool = False) -> LocalCluster:
    cluster = LocalCluster(root / "cluster", (SOURCE, DEST), netns=netns)
    # One benchmark migrates the same guest name dozens of times an hour: lift the hosts'
    # per-VM hourly admission limit, which exists against migration storms, not benchmarks.
    admission = f"[admission]\nmax_per_vm_per_hour = {BENCH_MAX_PER_VM_PER_HOUR}\n"
    cluster.setup(
        accept_tenants={SOURCE: [TENANT], DEST: [TENANT]},
        extra_config={SOURCE: admission, DEST: admission},
    )
    cluster.add_user(USER, USER_ROLES, tenant=TENANT)
    if with_agents:
        cluster.start_agents()
    return cluster


def _prepare_qemu_tls(cluster: LocalCluster, root: Path) -> QemuTls:
    """QEMU TLS dirs from the cluster CA: the destination serves, the source is the client."""
    dst_creds = Credentials.in_dir(cluster.hosts[DEST].dir / "pki", "host")
    src_creds = Credentials.in_dir(cluster.hosts[SOURCE].dir / "pki", "host")
    return QemuTls(
        server_dir=write_qemu_tls_dir(cluster.ca, dst_creds, root / "tls-dst", endpoint="server"),
        client_dir=write_qemu_tls_dir(cluster.ca, src_creds, root / "tls-src", endpoint="client"),
        server_hostname=DEST,
    )


def _direct_path(channel: str, cluster: LocalCluster, tunnel: IpsecTunnel | None) -> DirectPath:
    """Loopback, or the two host namespaces over the migration network or the tunnel."""
    lab = cluster.netlab
    if lab is None:
        return DirectPath()
    if channel == "ipsec":
        assert tunnel is not None
        a, b = tunnel.pids()
        return DirectPath(tuple(exec_argv(lab.ns(SOURCE), [])), tuple(exec_argv(lab.ns(DEST), [])),
                          inner_ip(lab, DEST), (a,), (b,))  # fmt: skip
    return DirectPath(tuple(exec_argv(lab.ns(SOURCE), [])), tuple(exec_argv(lab.ns(DEST), [])),
                      lab.migration_ip(DEST))  # fmt: skip


async def _run_one(
    p: RunPlan, cfg: BenchConfig, image: GuestImage, cluster: LocalCluster,
    tls: QemuTls | None, root: Path, tunnel: IpsecTunnel | None,
) -> dict[str, Any]:  # fmt: skip
    spec = guest_spec(cfg, p.dirty_rate, image)
    opts = migration_options(cfg, p.mode)
    if p.channel == "secure":
        return await run_secure(cluster, spec, opts)
    if p.channel == "secure+ipsec":
        assert tunnel is not None
        a, b = tunnel.pids()
        opts = opts.model_copy(update={"transport": "ipsec"})
        return await run_secure(cluster, spec, opts, channel=p.channel, helpers=((a,), (b,)))
    direct = "plain" if p.channel == "ipsec" else p.channel
    rec = await run_direct(direct, spec, image, choose_accel("auto"), root / f"run-{p.index:03d}",
                           opts, tls, _direct_path(p.channel, cluster, tunnel))  # fmt: skip
    rec["channel"] = p.channel
    return rec


async def _run_all(
    cfg: BenchConfig,
    plans: list[RunPlan],
    image: GuestImage,
    cluster: LocalCluster,
    tls: QemuTls | None,
    root: Path,
    on_progress: ProgressFn | None,
    on_run: RunFn | None,
    tunnel: IpsecTunnel | None = None,
) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for p in plans:
        if on_progress:
            on_progress(p.index, len(plans), p.label)
        t0 = time.monotonic()
        rec = await _run_one(p, cfg, image, cluster, tls, root, tunnel)
        rec["rep"] = p.rep
        rec["run_s"] = round(time.monotonic() - t0, 1)
        runs.append(rec)
        if on_run:
            on_run(rec)
    if on_progress:
        on_progress(len(plans), len(plans), "done")
    return runs


def run_migrate_bench(
    cfg: BenchConfig,
    *,
    workdir: Path | None = None,
    on_progress: ProgressFn | None = None,
    on_run: RunFn | None = None,
    say: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run every planned migration and return the report (see docs/benchmarks.md for fields).

    Failed runs are kept in ``runs`` with their error and simply do not count in the medians.
    """
    t_start = time.monotonic()
    say("building the guest image (cached after the first run)")
    image = build_image(progress=say)
    accel = choose_accel("auto")
    plans = plan_runs(cfg)
    tmp = tempfile.TemporaryDirectory(prefix="trustmig-bench-") if workdir is None else None
    root = Path(tmp.name) if tmp is not None else workdir.resolve()  # type: ignore[union-attr]
    root.mkdir(parents=True, exist_ok=True)
    cluster: LocalCluster | None = None
    tunnel: IpsecTunnel | None = None
    try:
        say("creating the cluster CA and host identities")
        cluster = _prepare_cluster(root, with_agents=False, netns=cfg.netns)
        # before the agents start: each agent seals its host key into its TPM and removes the
        # plaintext, which the bare-QEMU TLS baseline reads here
        tls = _prepare_qemu_tls(cluster, root) if "qemu-tls" in cfg.channels else None
        if cluster.netlab is not None and set(cfg.channels) & set(IPSEC_CHANNELS):
            say("bringing up the IKEv2/ESP tunnel between the hosts (strongSwan)")
            tunnel = IpsecTunnel(cluster.netlab, SOURCE, DEST, root)
            tunnel.up()
        if {"secure", "secure+ipsec"} & set(cfg.channels):
            cluster.start_agents()
        runs = asyncio.run(
            _run_all(cfg, plans, image, cluster, tls, root, on_progress, on_run, tunnel)
        )
    finally:
        if tunnel is not None:
            tunnel.down()
        if cluster is not None:
            cluster.stop()
        if tmp is not None:
            tmp.cleanup()
    report: dict[str, Any] = {
        "config": {
            **cfg.to_json(),
            "accel": accel.accel,
            "cpu_model": accel.cpu,
            "image_key": image.key,
            "order": "repetition-major, channels interleaved within each repetition",
            "elapsed_s": round(time.monotonic() - t_start, 1),
        }
    }
    report.update(summarize(runs, cfg.channels, cfg.dirty_rates, cfg.modes))
    if "secure" in cfg.channels and "plain" in cfg.channels:
        say("measuring the channel cipher's own cost on this machine")
        cost = measure_cipher_cost()
        report["cipher"] = cost.to_json()
        report["ratios"].update(cipher_overhead(report["results"], cost.both_sides_cpu_s_per_gib))
    report["runs"] = runs
    return report
