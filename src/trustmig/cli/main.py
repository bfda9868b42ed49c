"""`trustmig` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from trustmig.cli.common import (
    CliError,
    MigrationProgressView,
    connect,
    console,
    one_line_errors,
    out,
    print_json,
    run,
)
from trustmig.lab.flood import ALL_KINDS as ALL_FLOOD_KINDS

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Secure live migration of QEMU/KVM virtual machines.",
)
image_app = typer.Typer(no_args_is_help=True, help="Guest images.")
ca_app = typer.Typer(no_args_is_help=True, help="The cluster certificate authority.")
host_app = typer.Typer(no_args_is_help=True, help="Host identities.")
user_app = typer.Typer(no_args_is_help=True, help="User credentials.")
vm_app = typer.Typer(no_args_is_help=True, help="VMs on a host.")
app.add_typer(image_app, name="image")
app.add_typer(ca_app, name="ca")
app.add_typer(host_app, name="host")
app.add_typer(user_app, name="user")
app.add_typer(vm_app, name="vm")
from trustmig.cli.governance_cmds import audit_app, guard_app, policy_app  # noqa: E402

app.add_typer(policy_app, name="policy")
app.add_typer(audit_app, name="audit")
app.add_typer(guard_app, name="guard")
from trustmig.cli.attest_cmds import register as _register_attest  # noqa: E402
from trustmig.cli.cluster_cmds import cluster_app  # noqa: E402
from trustmig.cli.dashboard_cmds import register as _register_dashboard  # noqa: E402
from trustmig.cli.host_cmds import register as _register_host  # noqa: E402
from trustmig.cli.migration_cmds import migration_app  # noqa: E402
from trustmig.cli.placement_cmds import register as _register_placement  # noqa: E402

app.add_typer(cluster_app, name="cluster")
app.add_typer(migration_app, name="migration")

_register_attest(app, host_app)
_register_host(host_app)
_register_placement(app, cluster_app)
_register_dashboard(app)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
AgentOpt = Annotated[
    str | None,
    typer.Option("--agent", help="Agent control address HOST:PORT (default: $TRUSTMIG_AGENT)."),
]
CredOpt = Annotated[
    Path | None,
    typer.Option("--credentials", help="User credentials dir (default: $TRUSTMIG_CREDENTIALS)."),
]
CaDirOpt = Annotated[Path, typer.Option("--ca-dir", help="Cluster CA directory.")]


_errors = one_line_errors


# ---------------------------------------------------------------------------------- agent
@app.command()
def agent(
    config: Annotated[Path, typer.Option("--config", help="host.toml")],
    ready_file: Annotated[Path | None, typer.Option(help="Write JSON here once serving.")] = None,
    log_level: Annotated[str, typer.Option(help="debug|info|warning")] = "info",
    accept_audit_loss: Annotated[
        bool,
        typer.Option(
            "--accept-audit-loss",
            help="Start although peers witnessed a longer audit trail (recorded in the trail).",
        ),
    ] = False,
) -> None:
    """Run the host agent (long-running)."""
    from trustmig.agent.server import run_agent
    from trustmig.config import load_config

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with _errors(False):
        cfg = load_config(config)
        run_agent(cfg, ready_file, config.resolve(), accept_audit_loss=accept_audit_loss)


# ---------------------------------------------------------------------------------- image
@image_app.command("build")
def image_build(
    os_name: Annotated[
        Literal["lab", "debian-12"],
        typer.Option("--os", help="lab: kernel + busybox guest; debian-12: a real Debian disk."),
    ] = "lab",
    force: Annotated[bool, typer.Option(help="Rebuild even if cached.")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache directory.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build (or reuse) a guest image: the lab guest (Debian kernel, busybox initramfs,
    workload) or a Debian 12 disk with systemd, sshd, a test user and the workload."""
    say = None if as_json else lambda s: console.print(f"  {escape(s)}")
    with _errors(as_json):
        if os_name == "debian-12":
            from trustmig.hypervisor.debian import build_debian_image

            deb = build_debian_image(cache_dir, force=force, progress=say)
            data = {"os": os_name, "root": str(deb.root), "kernel": str(deb.kernel),
                    "cmdline": deb.cmdline(), "client_key": str(deb.client_key),
                    "known_hosts": str(deb.known_hosts), "key": deb.key}  # fmt: skip
            print_json(data) if as_json else out.print(
                escape(f"image {deb.key[:16]}: root {deb.root}, kernel {deb.kernel}")
            )
            return
        from trustmig.hypervisor.image import build_image

        img = build_image(cache_dir, force=force, progress=say)
        data = {"os": os_name, "kernel": str(img.kernel), "initrd": str(img.initrd),
                "key": img.key}  # fmt: skip
        print_json(data) if as_json else out.print(
            f"image {img.key[:16]}: {img.kernel}, {img.initrd}"
        )


# ---------------------------------------------------------------------------------- PKI
@ca_app.command("init")
def ca_init(ca_dir: CaDirOpt, force: bool = False, as_json: JsonOpt = False) -> None:
    """Create the cluster CA."""
    from trustmig.pki.authority import ClusterCA

    with _errors(as_json):
        ca = ClusterCA.init(ca_dir, force=force)
        data = {"ca_dir": str(ca_dir), "ca_cert": str(ca.ca_path)}
        print_json(data) if as_json else out.print(f"cluster CA created in {ca_dir}")


PushOpt = Annotated[
    list[str] | None,
    typer.Option("--push", help="Agent (HOST:PORT) to push the new CRL to; it passes it on."),
]


@host_app.command("revoke")
def host_revoke(
    name: str,
    ca_dir: CaDirOpt,
    push: PushOpt = None,
    credentials: CredOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke every certificate of a host; agents refuse it once they see the new CRL."""
    _revoke(name, "host", ca_dir, push, credentials, as_json)


def _revoke(
    name: str,
    kind: Literal["host", "user"],
    ca_dir: Path,
    push: list[str] | None,
    credentials: Path | None,
    as_json: bool,
) -> None:
    """Revoke ``name``'s certificates, push the new CRL to ``push``, say what happened."""
    from trustmig.pki.authority import ClusterCA

    with _errors(as_json):
        ca = ClusterCA.load(ca_dir)
        serials = ca.revoke(name, kind)
        data: dict[str, Any] = {kind: name, "revoked_serials": [hex(s) for s in serials]}
        data["pushed"] = _push_crl(ca.crl_path, push or [], credentials)
        print_json(data) if as_json else out.print(
            escape(f"revoked {len(serials)} certificate(s) of {name}")
            + escape(_pushed_line(data["pushed"]))
        )


@user_app.command("add")
def user_add(
    name: str,
    ca_dir: CaDirOpt,
    role: Annotated[
        list[str], typer.Option("--role", help="owner|operator|security-admin|auditor")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write user.key/user.pem.")],
    tenant: Annotated[str | None, typer.Option(help="Tenant the user belongs to.")] = None,
    days: int = 30,
    as_json: JsonOpt = False,
) -> None:
    """Issue user credentials carrying roles (and a tenant)."""
    from trustmig.pki.authority import ClusterCA

    with _errors(as_json):
        creds = ClusterCA.load(ca_dir).issue_user(
            name, out_dir, roles=role, tenant=tenant, days=days
        )
        data = {
            "user": name,
            "roles": role,
            "tenant": tenant,
            "credentials": str(out_dir),
            "cert": str(creds.cert_path),
        }
        print_json(data) if as_json else out.print(f"user {name} ({', '.join(role)}) -> {out_dir}")


@user_app.command("revoke")
def user_revoke(
    name: str,
    ca_dir: CaDirOpt,
    push: PushOpt = None,
    credentials: CredOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke every certificate of a user (and push the new CRL to agents)."""
    _revoke(name, "user", ca_dir, push, credentials, as_json)


def _push_crl(crl: Path, agents: list[str], credentials: Path | None) -> list[dict[str, Any]]:
    """Hand the CRL to each agent named; each passes it on to its peers."""
    pem = crl.read_text()

    async def one(agent: str) -> dict[str, Any]:
        c = await connect(agent, credentials)
        try:
            return await c.call("crl.update", {"crl": pem}, timeout=60)
        finally:
            await c.close()

    return [run(one(a)) for a in agents]


def _pushed_line(pushed: list[dict[str, Any]]) -> str:
    if not pushed:
        return "; push it with 'trustmig crl push --agent HOST:PORT' (agents pass it on)"
    return "; CRL number " + ", ".join(
        f"{p['number']} {'installed' if p['installed'] else 'already'} on {p['host']}"
        for p in pushed
    )


crl_app = typer.Typer(no_args_is_help=True, help="The cluster's certificate revocation list.")
app.add_typer(crl_app, name="crl")


@crl_app.command("push")
def crl_push(
    ca_dir: CaDirOpt,
    agent: Annotated[list[str], typer.Option("--agent", help="Agent control address(es).")],
    credentials: CredOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Push the CA's current CRL to agents (security-admin); each passes it on to its peers."""
    from trustmig.pki.authority import ClusterCA

    with _errors(as_json):
        pushed = _push_crl(ClusterCA.load(ca_dir).crl_path, agent, credentials)
        print_json({"pushed": pushed}) if as_json else out.print(escape(_pushed_line(pushed)[2:]))


@vm_app.command("transfer")
def vm_transfer(
    name: str,
    to: Annotated[str, typer.Option("--to", help="The user who owns the VM from now on.")],
    agent: AgentOpt = None,
    credentials: CredOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Hand a VM's ownership to another user of its tenant (owner, tenant-admin, security-admin)."""
    with _errors(as_json):

        async def go() -> dict[str, Any]:
            c = await connect(agent, credentials)
            try:
                return await c.call("vm.transfer", {"name": name, "to": to})
            finally:
                await c.close()

        res = run(go())
        print_json(res) if as_json else out.print(
            escape(f"{name}: owner {res['from']} -> {res['to']}; {res['note']}")
        )


# ---------------------------------------------------------------------------------- VMs
@vm_app.command("start")
def vm_start(
    name: str,
    agent: AgentOpt = None,
    credentials: CredOpt = None,
    lab: Annotated[
        bool, typer.Option("--lab", help="Start the lab guest NAME (implied by its options).")
    ] = False,
    memory: Annotated[int | None, typer.Option(help="Lab guest RAM in MiB (512).")] = None,
    vcpus: Annotated[int | None, typer.Option(help="Lab guest vCPUs (1).")] = None,
    workload_mib: Annotated[int | None, typer.Option(help="MiB of patterned memory (128).")] = None,
    dirty_rate: Annotated[float | None, typer.Option(help="MiB/s the workload rewrites.")] = None,
    tenant: Annotated[
        str | None, typer.Option(help="The VM's tenant (default: yours; others need an admin).")
    ] = None,
    owner: Annotated[
        str | None, typer.Option(help="The VM's owner (default: you; others: tenant-admin).")
    ] = None,
    secret: Annotated[str | None, typer.Option(help="Secret marker kept in guest memory.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Boot the VM defined as NAME (see 'vm define'), or a lab guest with --lab or its options,
    and wait until it runs (a guest with the workload: until the workload is ready)."""
    with _errors(as_json):
        lab_opts = (memory, vcpus, workload_mib, dirty_rate, tenant, owner, secret)
        params: dict[str, Any] = {"name": name}
        if lab or any(v is not None for v in lab_opts):
            params["spec"] = _lab_spec(name, memory, vcpus, workload_mib, dirty_rate, secret)
            params["spec"].update({k: v for k, v in (("tenant", tenant), ("owner", owner)) if v})

        async def go() -> dict[str, Any]:
            c = await connect(agent, credentials)
            try:
                return await c.call("vm.start", params, timeout=600)
            finally:
                await c.close()

        res = run(go())
        print_json(res) if as_json else out.print(f"{name}: {res['qemu_state']} (pid {res['pid']})")


def _lab_spec(
    name: str,
    memory: int | None,
    vcpus: int | None,
    workload_mib: int | None,
    dirty_rate: float | None,
    secret: str | None,
) -> dict[str, Any]:
    workload: dict[str, Any] = {"mem_mib": 128 if workload_mib is None else workload_mib,
                                "dirty_rate": dirty_rate or 0.0}  # fmt: skip
    if secret:
        workload["secret"] = secret
    return {"name": name, "memory_mib": memory or 512, "vcpus": vcpus or 1, "workload": workload}


@vm_app.command("define")
def vm_define(
    file: Annotated[Path, typer.Argument(help="A VM definition (TOML, see docs/vms.md).")],
    agent: AgentOpt = None,
    credentials: CredOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Define a VM on the agent's host from a definition file (checked here and there)."""
    from trustmig.hypervisor.spec import DefinitionError, read_definition

    with _errors(as_json):
        try:
            raw, spec = read_definition(file)
        except DefinitionError as e:
            raise CliError(str(e)) from None

        async def go() -> dict[str, Any]:
            c = await connect(agent, credentials)
            try:
                return await c.call("vm.define", {"definition": raw})
            finally:
                await c.close()

        res = run(go())
        verb = "redefined" if res["replaced"] else "defined"
        line = (
            f"{spec.name}: {verb} (tenant {res['tenant']}, owner {res['owner']}); "
            f"start it with 'trustmig vm start {spec.name}'"
        )
        print_json(res) if as_json else out.print(escape(line))


@vm_app.command("undefine")
def vm_undefine(
    name: str, agent: AgentOpt = None, credentials: CredOpt = None, as_json: JsonOpt = False
) -> None:
    """Forget a VM's definition (refused while it runs)."""
    _simple_call(
        "vm.undefine",
        {"name": name},
        agent,
        credentials,
        as_json,
        lambda r: f"{name}: {r['state']}",
    )


@vm_app.command("list")
def vm_list(agent: AgentOpt = None, credentials: CredOpt = None, as_json: JsonOpt = False) -> None:
    """List the VMs of the agent's host."""
    with _errors(as_json):

        async def go() -> dict[str, Any]:
            c = await connect(agent, credentials)
            try:
                return await c.call("vm.list")
            finally:
                await c.close()

        res = run(go())
        if as_json:
            print_json(res)
            return
        t = Table("name", "state", "qemu", "pid", "MiB", "tenant", "last HB", title=res["host"])
        for v in res["vms"]:
            t.add_row(
                v["name"],
                v["state"],
                v["qemu_state"],
                str(v["pid"]),
                str(v["memory_mib"]),
                str(v["tenant"]),
                str(v.get("last_heartbeat")),
            )
        out.print(t)


@vm_app.command("stop")
def vm_stop(
    name: str, agent: AgentOpt = None, credentials: CredOpt = None, as_json: JsonOpt = False
) -> None:
    """Stop a VM."""
    _simple_call(
        "vm.stop", {"name": name}, agent, credentials, as_json, lambda r: f"{name}: {r['state']}"
    )


@vm_app.command("resume")
def vm_resume(
    name: str, agent: AgentOpt = None, credentials: CredOpt = None, as_json: JsonOpt = False
) -> None:
    """Resume a paused VM (after an in-doubt migration was checked by hand)."""
    _simple_call(
        "vm.resume",
        {"name": name},
        agent,
        credentials,
        as_json,
        lambda r: f"{name}: {r['qemu_state']}",
    )


@vm_app.command("check")
def vm_check(
    name: str, agent: AgentOpt = None, credentials: CredOpt = None, as_json: JsonOpt = False
) -> None:
    """Ask the guest to verify its own memory (every page and the secret marker)."""
    _simple_call(
        "vm.check",
        {"name": name},
        agent,
        credentials,
        as_json,
        lambda r: (
            f"{name}: {r['pages']} pages, {r['bad_pages']} bad, marker "
            f"{r['marker_ok']}/{r['marker_total']}, digest {r['digest']}"
        ),
    )


def _simple_call(
    op: str,
    params: dict[str, Any],
    agent: str | None,
    credentials: Path | None,
    as_json: bool,
    line: Any,
) -> None:
    with _errors(as_json):

        async def go() -> dict[str, Any]:
            c = await connect(agent, credentials)
            try:
                return await c.call(op, params, timeout=300)
            finally:
                await c.close()

        res = run(go())
        print_json(res) if as_json else out.print(line(res))


# ---------------------------------------------------------------------------------- migrate


def _narrator(as_json: bool) -> Any:
    """Where long commands say what they are doing: the console, or nowhere with --json."""
    if as_json:
        return lambda s: None
    return lambda s: console.print(f"[cyan]»[/] {s}")


def _write_json(path: Path, report: Any) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


@app.command()
def migrate(
    vm: str,
    to: Annotated[str, typer.Option("--to", help="Destination host name.")],
    agent: AgentOpt = None,
    credentials: CredOpt = None,
    postcopy: Annotated[bool, typer.Option(help="Switch to post-copy after a few rounds.")] = False,
    postcopy_after: Annotated[int, typer.Option(help="Rounds before the post-copy switch.")] = 2,
    multifd: Annotated[int, typer.Option(help="Parallel multifd streams (0 = off).")] = 0,
    postcopy_preempt: Annotated[
        bool, typer.Option(help="Post-copy: requested pages on a stream of their own.")
    ] = True,
    downtime_ms: Annotated[int, typer.Option(help="Maximum downtime QEMU aims for.")] = 300,
    bandwidth_mibps: Annotated[int | None, typer.Option(help="Bandwidth cap, MiB/s.")] = None,
    no_auto_converge: bool = False,
    channel: Annotated[
        str,
        typer.Option(
            help="secure (trustmig's channel) or qemu-tls (QEMU's own TLS, cluster certificates); "
            "both are encrypted, mutually authenticated and attested."
        ),
    ] = "secure",
    transport: Annotated[
        str,
        typer.Option(
            help="direct, or ipsec: the channel runs inside the hosts' IPsec tunnel "
            "(the peer's tunnel_data address)."
        ),
    ] = "direct",
    as_json: JsonOpt = False,
) -> None:
    """Live-migrate a running VM to another host, encrypted and attested."""
    with _errors(as_json):
        if channel not in ("secure", "qemu-tls"):
            raise CliError(f"--channel {channel!r} is not known: use secure or qemu-tls")
        if transport not in ("direct", "ipsec"):
            raise CliError(f"--transport {transport!r} is not known: use direct or ipsec")
        opts = {
            "mode": "postcopy" if postcopy else "precopy",
            "multifd": multifd,
            "postcopy_preempt": postcopy_preempt,
            "channel": channel,
            "transport": transport,
            "downtime_ms": downtime_ms,
            "max_bandwidth_mibps": bandwidth_mibps,
            "postcopy_after_rounds": postcopy_after,
            "auto_converge": not no_auto_converge,
        }

        async def go() -> dict[str, Any]:
            c = await connect(agent, credentials)
            try:
                with MigrationProgressView(not as_json) as view:
                    return await c.call(
                        "migrate",
                        {"vm": vm, "to": to, "options": opts},
                        on_event=view.event,
                        timeout=None,
                    )
            finally:
                await c.close()

        res = run(go())
        res.pop("source_heartbeats", None)
        if as_json:
            print_json(res)
            return
        out.print(
            f"[green]{vm} migrated[/] {res['source']} -> {res['destination']} ({res['mode']}, "
            f"{res['channel']} channel): {res['total_ms']} ms total, "
            f"{res['downtime_ms']} ms downtime, "
            f"{res['throughput_mbps']} MB/s, attestation {res['attestation']}"
        )


# ---------------------------------------------------------------------------------- demo
@app.command()
def demo(
    as_json: JsonOpt = False,
    state_dir: Annotated[Path | None, typer.Option(help="Keep both hosts' state here.")] = None,
    memory: Annotated[int, typer.Option(help="Guest RAM, MiB.")] = 512,
    dirty_rate: Annotated[float, typer.Option(help="Workload dirtying rate, MiB/s.")] = 16.0,
    postcopy: bool = False,
    multifd: int = 0,
    dest_data_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT the destination's data listener binds.")
    ] = None,
    dest_data_advertise: Annotated[
        str | None, typer.Option(help="HOST:PORT the destination advertises to the source.")
    ] = None,
    guest: Annotated[
        Literal["lab", "debian"],
        typer.Option(help="lab: the fast busybox guest; debian: a real OS checked over ssh."),
    ] = "lab",
    measure: Annotated[
        bool, typer.Option(help="Measure the guest kernel's code on both ends (pre-copy).")
    ] = True,
    netns: Annotated[
        bool,
        typer.Option(
            help="Hosts in network namespaces, the guest on a bridged guest network "
            "and its clients measured (needs --guest debian)."
        ),
    ] = False,
) -> None:
    """Two agents; boot a guest on one, live-migrate it to the other, measure."""
    from trustmig.cli.demo import run_demo

    with _errors(as_json):
        say = _narrator(as_json)
        with MigrationProgressView(not as_json) as view:
            res = run_demo(
                state_dir=state_dir.resolve() if state_dir else None,
                memory=memory,
                dirty_rate=dirty_rate,
                postcopy=postcopy,
                multifd=multifd,
                dest_data_listen=dest_data_listen,
                dest_data_advertise=dest_data_advertise,
                say=say,
                on_event=view.event,
                guest=guest,
                measure=measure,
                netns=netns,
            )
        if as_json:
            print(json.dumps(res, default=str))
        else:
            t = Table("field", "value", title="trustmig demo")
            for k in (
                "status",
                "mode",
                "channel",
                "attestation",
                "user",
                "total_ms",
                "downtime_ms",
                "heartbeat_gap_ms",
                "heartbeat_seq_continuous",
                "memory_checksum_match",
                "bytes_transferred",
                "throughput_mbps",
                "handshake_ms",
                "source_state",
                "destination_state",
                "error",
            ):
                t.add_row(k, str(res.get(k)))
            out.print(t)
        if res["status"] != "completed":
            raise typer.Exit(1)


# ---------------------------------------------------------------------------------- bench
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks of live migration.")
app.add_typer(bench_app, name="bench")


@bench_app.command("migrate")
def bench_migrate(
    channel: Annotated[
        str,
        typer.Option(
            help="Comma-separated channels: plain, secure, qemu-tls, and with --netns "
            "also ipsec, secure+ipsec."
        ),
    ] = "plain,secure,qemu-tls",
    netns: Annotated[
        bool, typer.Option(help="Hosts in network namespaces, over their migration network.")
    ] = False,
    memory: Annotated[int, typer.Option(help="Guest RAM, MiB.")] = 1024,
    fill: Annotated[
        int | None, typer.Option(help="MiB the workload fills (default: memory - 160).")
    ] = None,
    dirty_rate: Annotated[
        str, typer.Option(help="Comma-separated workload dirtying rates, MiB/s.")
    ] = "0",
    repeat: Annotated[int, typer.Option(help="Runs per channel and dirty rate.")] = 3,
    postcopy: Annotated[bool, typer.Option(help="Also measure post-copy migrations.")] = False,
    postcopy_preempt: Annotated[
        bool, typer.Option(help="Post-copy runs use QEMU's preempt channel.")
    ] = True,
    prealloc: Annotated[bool, typer.Option(help="-mem-prealloc on every destination.")] = True,
    output: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    disk_mib: Annotated[
        int | None,
        typer.Option(
            help="Instead: copy a disk of this size through trustmig and through "
            "QEMU's plain NBD mirror, interleaved; MB/s and their ratio."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Migrate the same guest over each channel, interleaved; report medians and ratios."""
    from trustmig.bench import BenchConfig, BenchError, parse_channels, parse_dirty_rates
    from trustmig.bench.display import BenchProgress, results_table

    if disk_mib is not None:
        _bench_disk(disk_mib, repeat, output, as_json)
        return
    with _errors(as_json):
        try:
            cfg = BenchConfig(
                channels=parse_channels(channel),
                memory_mib=memory,
                fill_mib=fill,
                dirty_rates=parse_dirty_rates(dirty_rate),
                repeat=repeat,
                postcopy=postcopy,
                postcopy_preempt=postcopy_preempt,
                prealloc_destination=prealloc,
                netns=netns,
            )
            from trustmig.bench import run_migrate_bench

            say = _narrator(as_json)
            with BenchProgress(not as_json, console) as bar:
                report = run_migrate_bench(
                    cfg, on_progress=bar.update, on_run=bar.run_done, say=say
                )
        except BenchError as e:
            raise CliError(str(e)) from None
        if output is not None:
            _write_json(output, report)
        if as_json:
            print(json.dumps(report, default=str))
        else:
            from rich.console import Console

            # piped output keeps every column readable instead of folding to 80 columns
            (out if out.is_terminal else Console(width=150)).print(results_table(report))
            if output is not None:
                console.print(f"report written to {output}")
        if any(r["status"] != "completed" for r in report["runs"]):
            raise typer.Exit(1)


def _bench_disk(disk_mib: int, repeat: int, output: Path | None, as_json: bool) -> None:
    from trustmig.bench import BenchError
    from trustmig.bench.disk import run_disk_bench

    with _errors(as_json):
        try:
            report = run_disk_bench(disk_mib, repeat, say=_narrator(as_json))
        except BenchError as e:
            raise CliError(str(e)) from None
        if output is not None:
            _write_json(output, report)
        if as_json:
            print(json.dumps(report, default=str))
            return
        t = Table("channel", "run", "MB/s", "seconds", title=f"disk copy, {disk_mib} MiB")
        for i, r in enumerate(report["runs"]):
            t.add_row(r["channel"], str(i // 2 + 1), str(r["throughput_mbps"]), str(r["seconds"]))
        out.print(t)
        med = report["median_mbps"]
        out.print(f"medians: plain {med['plain']} MB/s, secure {med['secure']} MB/s, "
                  f"secure/plain {report['ratio_secure_plain']}")  # fmt: skip


@bench_app.command("flood")
def bench_flood(
    memory: Annotated[int, typer.Option(help="Guest RAM, MiB.")] = 1024,
    dirty_rate: Annotated[float, typer.Option(help="Workload dirtying rate, MiB/s.")] = 0.0,
    repeat: Annotated[int, typer.Option(help="Unloaded/flooded pairs.")] = 3,
    rate: Annotated[
        float | None,
        typer.Option(
            help="Flood connection attempts per second (default 1000; 400 from the peer's)."
        ),
    ] = None,
    kinds: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated flood kinds (default all; garbage,halfopen from the peer's)."
        ),
    ] = None,
    sources: Annotated[int, typer.Option(help="Flooding loopback addresses (127.0.0.2..).")] = 8,
    from_peer_address: Annotated[
        bool,
        typer.Option(
            "--from-peer-address",
            help="Flood the data port from 127.0.0.1, the address the source agent uses too.",
        ),
    ] = False,
    output: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Migrate a guest with and without a flood on the destination agent; compare."""
    from trustmig.bench import BenchError
    from trustmig.bench.flood import (
        PEER_ADDRESS_KINDS,
        PEER_ADDRESS_RATE,
        FloodBenchConfig,
        run_flood_bench,
    )

    default_kinds = PEER_ADDRESS_KINDS if from_peer_address else ALL_FLOOD_KINDS
    default_rate = PEER_ADDRESS_RATE if from_peer_address else 1000.0
    chosen_kinds = (kinds or ",".join(default_kinds)).split(",")
    with _errors(as_json):
        try:
            cfg = FloodBenchConfig(
                memory_mib=memory,
                dirty_rate=dirty_rate,
                repeat=repeat,
                rate_per_s=default_rate if rate is None else rate,
                sources=sources,
                kinds=tuple(k.strip() for k in chosen_kinds if k.strip()),
                from_peer_address=from_peer_address,
            )
            say = _narrator(as_json)
            with Progress(console=console, disable=as_json) as bar:
                task = bar.add_task("migrations", total=2 * repeat)
                report = run_flood_bench(cfg, on_run=lambda r: bar.advance(task), say=say)
        except BenchError as e:
            raise CliError(str(e)) from None
        if output is not None:
            _write_json(output, report)
        if as_json:
            print(json.dumps(report, default=str))
        else:
            t = Table("", "unloaded", "flooded", title="migration under a flood")
            for k in ("throughput_mbps", "total_ms", "downtime_ms", "completed"):
                t.add_row(
                    k,
                    str(report["results"]["unloaded"].get(k)),
                    str(report["results"]["flooded"].get(k)),
                )
            out.print(t)
            out.print(
                f"flooded/unloaded throughput: {report['ratios']['flooded/unloaded']} "
                f"(goal >= {report['goal']['flooded/unloaded']})"
            )
            out.print(
                f"flood: {report['flood']['attempted']} attempts at "
                f"{report['flood']['achieved_rate_per_s']}/s; destination agent peak RSS "
                f"{report['destination_agent_memory_kib']['peak_vmhwm']} KiB"
            )
        if any(r["status"] != "completed" for r in report["runs"]):
            raise typer.Exit(1)


@bench_app.command("relay")
def bench_relay(
    total_mib: Annotated[int, typer.Option(min=16, max=65536, help="MiB carried per run.")] = 1024,
    write_bytes: Annotated[
        int, typer.Option(min=512, max=1 << 20, help="Bytes per write of the feeder (QEMU's).")
    ] = 32 * 1024,
    repeat: Annotated[int, typer.Option(min=1, max=20, help="Runs of each kind (best kept).")] = 3,
    output: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """One stream through the channel's pumps alone (no QEMU), against one plain TCP hop."""
    from trustmig.bench.relay import run_relay_bench

    with _errors(as_json):
        try:
            report = run_relay_bench(total_mib, write_bytes, repeat)
        except RuntimeError as e:
            raise CliError(f"relay benchmark failed: {e}") from None
        if output is not None:
            _write_json(output, report)
        if as_json:
            print(json.dumps(report, default=str))
            return
        t = Table("", "GB/s", "CPU s/GiB src", "CPU s/GiB dst", title="one stream, no QEMU")
        for k in ("plain", "relay"):
            r = report[k]
            t.add_row(k, str(r["gbps"]), str(r["cpu_s_per_gib_source"]),
                      str(r["cpu_s_per_gib_destination"]))  # fmt: skip
        out.print(t)
        out.print(
            f"relay adds {report['relay_cpu_s_per_gib_added']} CPU s/GiB (both sides), "
            f"{report['relay_overhead_vs_cipher']}x the cipher's own "
            f"{report['cipher']['both_sides_cpu_s_per_gib']}"
        )


@bench_app.command("plan")
def bench_plan(
    hosts: Annotated[int, typer.Option(min=2, max=100_000, help="Hosts to generate.")] = 1000,
    vms: Annotated[int, typer.Option(min=0, max=1_000_000, help="VMs to generate.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Seed of the generated cluster.")] = 1,
    repeat: Annotated[int, typer.Option(min=1, max=20, help="Plans per goal (best kept).")] = 3,
    output: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Time evacuate, balance and consolidate on a generated cluster and check every plan."""
    from trustmig.bench.plan import run_plan_bench

    with _errors(as_json):
        report = run_plan_bench(hosts, vms, seed, repeat)
        if output is not None:
            _write_json(output, report)
        if as_json:
            print(json.dumps(report))
        else:
            _print_plan_bench(report)
        if report["goal"]["violations"]:
            raise typer.Exit(1)


def _print_plan_bench(report: dict[str, Any]) -> None:
    title = f"{report['hosts']} hosts, {report['vms']} VMs (seed {report['seed']})"
    t = Table("goal", "s", "moves", "imbalance", "hosts in use", "stuck", "violations",
              title=title)  # fmt: skip
    for name, g in report["goals"].items():
        b, a = g["before"], g["after"]
        t.add_row(name, str(g["plan_seconds"]), str(g["moves"]),
                  f"{b['imbalance']} -> {a['imbalance']}",
                  f"{b['hosts_in_use']} -> {a['hosts_in_use']}",
                  str(sum(g["stuck"].values())), str(g["violations"]))  # fmt: skip
    out.print(t)
    goal = report["goal"]
    verdict = "met" if goal["met"] else "NOT met"
    out.print(f"slowest plan {goal['slowest_plan_seconds']} s "
              f"(goal <= {goal['plan_seconds_max']} s: {verdict}); "
              f"violations {goal['violations']}")  # fmt: skip


# ---------------------------------------------------------------------------------- lab
def _verdict(compromised: bool | None, safe_word: str) -> str:
    if compromised is None:
        return "[yellow]error[/]"
    return "[red]compromised[/]" if compromised else f"[green]{safe_word}[/]"


lab_app = typer.Typer(
    no_args_is_help=True, help="Attack lab: the survey's attacks, baseline vs trustmig."
)
app.add_typer(lab_app, name="lab")


@lab_app.command("run")
def lab_run(
    attack: Annotated[
        list[str] | None,
        typer.Option("--attack", help="Run only this attack (repeatable); default: all."),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Write a self-contained HTML report here (and Markdown beside it)."),
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Keep QEMU/agent files here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run each attack against unprotected QEMU migration and against trustmig."""
    from trustmig.lab.runner import run_lab, select

    with _errors(as_json):
        try:
            chosen = select(attack)
        except ValueError as e:
            raise CliError(str(e)) from None
        say = _narrator(as_json)
        with Progress(console=console, disable=as_json) as bar:
            task = bar.add_task("attacks", total=len(chosen))

            def done(entry: dict[str, Any]) -> None:
                bar.advance(task)
                if not as_json:
                    b, t = entry["baseline_compromised"], entry["trustmig_compromised"]
                    console.print(
                        f"  {entry['name']}: baseline {_verdict(b, 'held')}, "
                        f"trustmig {_verdict(t, 'blocked')}"
                    )

            res = run_lab([a.name for a in chosen], workdir=workdir, say=say, on_result=done)
        if output is not None:
            _write_json(output, res)
        if report is not None:
            from trustmig.lab.report import write_reports

            html, md = write_reports(res, report)
            if not as_json:
                console.print(f"report: {html} and {md}")
        if as_json:
            print(json.dumps(res, default=str))
        else:
            t = Table(
                "attack",
                "baseline",
                "trustmig",
                "trustmig outcome",
                title=f"attack lab ({res['duration_s']} s)",
            )
            for entry in res["attacks"]:
                t.add_row(
                    entry["name"],
                    str(entry["baseline_compromised"]),
                    str(entry["trustmig_compromised"]),
                    str(entry["trustmig"].get("outcome"))[:110],
                )
            out.print(t)
        if res["summary"]["trustmig_compromised"] or res["summary"]["errors"]:
            raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":
    sys.exit(app())
