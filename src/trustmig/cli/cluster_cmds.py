"""`trustmig cluster up|status|down|exec`: a local cluster of real agents, in the background.

For trying trustmig and for tests: a CA, N enrolled hosts with their own swtpm and state under
``DIR/<host>``, a user with roles owner and operator (tenant ``acme``), and one agent process per
host that keeps running after the command returns. ``up`` on an existing directory only starts
the agents that do not run. ``down`` stops the agents and every guest and relay their journals
name (by PID and start time); the directory stays, so ``up`` brings the same cluster back.

With ``--netns`` every host runs in its own network namespace on separate management, migration
and guest networks (see :mod:`trustmig.netns.topology`); the CLI then reaches the agents from
the admin namespace: ``trustmig cluster exec --state-dir DIR -- trustmig vm list``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from trustmig.cli.common import CliError, console, one_line_errors, out, print_json

cluster_app = typer.Typer(
    no_args_is_help=True, help="A local cluster of agents (loopback or network namespaces)."
)

StateDirOpt = Annotated[Path, typer.Option("--state-dir", help="Directory of the cluster.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def _host_names(n: int) -> tuple[str, ...]:
    if not 1 <= n <= 26:
        raise CliError(f"--hosts {n} is out of range: use 1-26")
    return tuple(f"host-{chr(ord('a') + i)}" for i in range(n))


def _exports(summary: dict[str, Any]) -> str:
    first = summary["hosts"][0]["control"] if summary["hosts"] else ""
    return f"export TRUSTMIG_AGENT={first} TRUSTMIG_CREDENTIALS={summary['credentials']}"


@cluster_app.command("up")
def cluster_up(
    state_dir: StateDirOpt,
    hosts: Annotated[int, typer.Option("--hosts", help="Number of hosts (new cluster).")] = 2,
    netns: Annotated[
        bool,
        typer.Option(
            "--netns",
            help="Each host in its own network namespace, on separate "
            "management, migration and guest networks (new cluster; needs root).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create (or start again) a local cluster and leave its agents running."""
    from trustmig.agent.local_cluster import DEFAULT_USER, LocalCluster

    with one_line_errors(as_json):
        root = state_dir.resolve()
        if LocalCluster.exists(root):
            cluster = LocalCluster.load(root)
            if len(cluster.hosts) != hosts and not as_json:
                console.print(
                    f"[yellow]{root} already holds a cluster of {len(cluster.hosts)} hosts; "
                    "starting it as it is[/]"
                )
        else:
            cluster = LocalCluster(root, _host_names(hosts), netns=netns)
            if not as_json:
                console.print(f"creating a {hosts}-host cluster in {root}")
            cluster.setup()
            cluster.add_user(DEFAULT_USER, ["owner", "operator"], tenant="acme")
        started = cluster.start_missing()
        summary = {**cluster.summary(), "started": started}
        if as_json:
            print_json(summary)
            return
        _print_hosts(summary)
        out.print(_exports(summary))


@cluster_app.command("status")
def cluster_status(state_dir: StateDirOpt, as_json: JsonOpt = False) -> None:
    """Which agents run, and what each host says of itself."""
    with one_line_errors(as_json):
        cluster = _load(state_dir)
        summary = cluster.summary()
        summary["hosts"] = [
            {**h, **asyncio.run(_host_view(cluster, h["name"]))} if h["running"] else h
            for h in summary["hosts"]
        ]
        if as_json:
            print_json(summary)
            return
        _print_hosts(summary)


async def _host_view(cluster: Any, host: str) -> dict[str, Any]:
    from trustmig.agent.client import ControlError

    try:
        c = await cluster.client(host, "alice")
    except ControlError as e:
        return {"reachable": False, "error": str(e)}
    try:
        vms = (await c.call("vm.list", timeout=10))["vms"]
        migs = (await c.call("migration.list", {"limit": 20}, timeout=10))["migrations"]
        active = [m for m in migs if m["state"] not in _TERMINAL]
        return {"reachable": True, "vms": len(vms), "active_migrations": len(active)}
    except ControlError as e:
        return {"reachable": False, "error": str(e)}
    finally:
        await c.close()


_TERMINAL = ("completed", "rolled-back", "refused", "failed", "committed", "aborted")


@cluster_app.command("down")
def cluster_down(state_dir: StateDirOpt, as_json: JsonOpt = False) -> None:
    """Stop the agents, and every guest and relay of the cluster."""
    with one_line_errors(as_json):
        cluster = _load(state_dir)
        ended = cluster.down()
        res = {"state_dir": str(cluster.root), "stopped_agents": list(cluster.hosts),
               "ended_processes": ended}  # fmt: skip
        if as_json:
            print_json(res)
            return
        n = sum(len(v) for v in ended.values())
        out.print(f"cluster in {cluster.root} is down ({len(cluster.hosts)} agents, {n} guests "
                  "and relays ended)")  # fmt: skip


@cluster_app.command(
    "exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def cluster_exec(
    ctx: typer.Context,
    state_dir: StateDirOpt,
    host: Annotated[
        str | None, typer.Option("--host", help="Agent TRUSTMIG_AGENT points at (default: first).")
    ] = None,
) -> None:
    """Run a command where the cluster's agents can be reached (the admin namespace of a
    namespaced cluster), with TRUSTMIG_AGENT and TRUSTMIG_CREDENTIALS set:
    ``trustmig cluster exec --state-dir DIR -- trustmig vm list``."""
    import os
    import shutil
    import subprocess

    with one_line_errors(False):
        cluster = _load(state_dir)
        argv = list(ctx.args)
        if not argv:
            raise CliError("give the command after --, e.g. -- trustmig vm list")
        name = host or next(iter(cluster.hosts))
        if name not in cluster.hosts:
            raise CliError(f"no host {name!r} in this cluster: {', '.join(cluster.hosts)}")
        summary = cluster.summary()
        env = {**os.environ, "TRUSTMIG_AGENT": cluster.hosts[name].control,
               "TRUSTMIG_CREDENTIALS": summary["credentials"]}  # fmt: skip
        if argv[0] == "trustmig" and shutil.which("trustmig") is None:
            argv[0] = str(Path(sys.executable).with_name("trustmig"))
        if cluster.netlab is not None:
            argv = ["ip", "netns", "exec", cluster.netlab.ns("admin"), *argv]
        raise typer.Exit(subprocess.run(argv, env=env, check=False).returncode)


def _load(state_dir: Path) -> Any:
    from trustmig.agent.local_cluster import LocalCluster

    root = state_dir.resolve()
    if not LocalCluster.exists(root):
        raise CliError(f"no cluster in {root}: create one with 'trustmig cluster up --state-dir "
                       f"{state_dir}'")  # fmt: skip
    return LocalCluster.load(root)


def _print_hosts(summary: dict[str, Any]) -> None:
    title = summary["state_dir"] + (" (network namespaces)" if summary.get("netns") else "")
    t = Table("host", "control", "agent pid", "running", "VMs", title=title)
    for h in summary["hosts"]:
        t.add_row(h["name"], h["control"], str(h["pid"]), str(h["running"]), str(h.get("vms", "")))
    out.print(t)
