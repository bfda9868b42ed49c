"""`trustmig evacuate HOST`, `balance`, `consolidate` and `cluster loads`: automatic migration
on verified facts.

Evacuate asks HOST's own agent (``--agent``) to plan and run its evacuation: the agent judges
every peer's measured, signed and TPM-quoted load, quarantines a peer that lies, asks each VM's
policy which peers it may go to (with the caller as the user), and migrates each VM through the
ordinary, attested migration path, at most ``--parallel`` at a time. ``--dry-run`` prints the
plan only.

Balance and consolidate plan the whole cluster from the agent at ``--agent`` (the vantage host,
whose verified view of its peers is all the plan trusts) and run each move on its source agent
with the operator's own credentials, at most ``--parallel`` from one host and
``--cluster-parallel`` in all. ``--dry-run --json`` prints a plan that ``--plan FILE`` later
runs exactly, after checking it still fits the cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from trustmig.cli.common import (
    CliError,
    call_agent,
    connect,
    console,
    one_line_errors,
    out,
    print_json,
    resolve_agent,
    run,
)
from trustmig.coordinator import Caps, execute, fresh_plan, gather, replayed_plan
from trustmig.placement import Goal, PlanLimits
from trustmig.placement.errors import PlacementError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
AgentOpt = Annotated[
    str | None,
    typer.Option("--agent", help="HOST's agent control address (default: $TRUSTMIG_AGENT)."),
]
CredOpt = Annotated[
    Path | None,
    typer.Option("--credentials", help="User credentials dir (default: $TRUSTMIG_CREDENTIALS)."),
]


DryRunOpt = Annotated[bool, typer.Option(help="Print the plan; move nothing.")]
PlanFileOpt = Annotated[
    Path | None,
    typer.Option("--plan", help="Run this saved --dry-run --json plan, if it still fits."),
]
ParallelOpt = Annotated[int, typer.Option(min=1, max=5, help="Migrations at once per host.")]
ClusterParallelOpt = Annotated[
    int, typer.Option(min=1, max=20, help="Migrations at once in the cluster.")
]
PostcopyOpt = Annotated[bool, typer.Option(help="Migrate in post-copy mode.")]
VantageOpt = Annotated[
    str | None,
    typer.Option("--agent", help="The agent whose verified view to plan on "
                 "(default: $TRUSTMIG_AGENT)."),
]  # fmt: skip


def _print_hosts(hosts: list[dict[str, Any]]) -> None:
    t = Table("peer", "verified", "rule", "reason", title="peers' measured load")
    for h in hosts:
        ok = "[green]yes[/]" if h["accept"] else "[red]no[/]"
        if h.get("quarantined") or h.get("lie"):
            ok = "[red]quarantined[/]"
        t.add_row(h["host"], ok, h["rule"], escape(str(h["reason"]))[:70])
    out.print(t)


def _print_plan(doc: dict[str, Any]) -> None:
    _print_hosts(doc["hosts"])
    title = f"evacuate {doc['host']}" if "host" in doc else f"{doc['goal']} (from {doc['vantage']})"
    t = Table("vm", "from", "to", "why", title=f"{title}: {len(doc['moves'])} moves")
    for m in doc["moves"]:
        t.add_row(m["vm"], m["source"], m["destination"], escape(m["why"]))
    out.print(t)
    for s in doc["stuck"]:
        out.print(f"[yellow]stays[/] {s['vm']} ({s['code']}): {escape(s['why'])}")
    b, a = doc["before"], doc["after"]
    out.print(f"hosts in use {b['hosts_in_use']} -> {a['hosts_in_use']}; "
              f"imbalance {b['imbalance']} -> {a['imbalance']}")  # fmt: skip
    if doc.get("freed_hosts"):
        out.print(f"hosts that can be powered down: {', '.join(doc['freed_hosts'])}")


def _print_outcomes(doc: dict[str, Any]) -> None:
    for o in doc.get("outcomes", []):
        if o["status"] == "completed" and "host" not in doc:
            out.print(f"[green]moved[/] {o['vm']} {o['source']} -> {o['destination']} "
                      f"({o['seconds']} s, {o.get('downtime_ms')} ms downtime)")  # fmt: skip
        elif o["status"] == "completed":
            out.print(f"[green]moved[/] {o['vm']} -> {o['destination']} ({o['seconds']} s, "
                      f"{o.get('downtime_ms')} ms downtime)")  # fmt: skip
        else:
            out.print(f"[red]failed[/] {o['vm']} -> {o['destination']}: {escape(o['error'])}")
    if "remaining" in doc:
        left = ", ".join(doc["remaining"]) or "none"
        out.print(f"VMs left on {doc['host']}: {left}")


def register(app: typer.Typer, cluster_app: typer.Typer) -> None:
    @app.command("evacuate")
    def evacuate(
        host: Annotated[str, typer.Argument(help="The host to empty (its agent is --agent).")],
        dry_run: Annotated[bool, typer.Option(help="Print the plan; move nothing.")] = False,
        parallel: Annotated[
            int, typer.Option(min=1, max=5, help="Migrations at once from HOST.")
        ] = 2,
        postcopy: Annotated[bool, typer.Option(help="Migrate in post-copy mode.")] = False,
        agent: AgentOpt = None,
        credentials: CredOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Move every VM off HOST for maintenance, only to verified, allowed peers."""
        params = {"dry_run": dry_run, "parallel": parallel,
                  "options": {"mode": "postcopy" if postcopy else "precopy"}}  # fmt: skip
        with one_line_errors(as_json):
            doc = run(_evacuate(host, params, agent, credentials, as_json))
            if as_json:
                print_json(doc)
            else:
                _print_plan(doc)
                _print_outcomes(doc)
            if any(o["status"] != "completed" for o in doc.get("outcomes", [])):
                raise typer.Exit(1)

    @app.command("balance")
    def balance(
        dry_run: DryRunOpt = False,
        plan_file: PlanFileOpt = None,
        threshold: Annotated[
            float,
            typer.Option(min=0.01, max=0.99, help="Stop once all loads are this close (fraction)."),
        ] = 0.10,
        parallel: ParallelOpt = 2,
        cluster_parallel: ClusterParallelOpt = 5,
        postcopy: PostcopyOpt = False,
        agent: VantageOpt = None,
        credentials: CredOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Spread load across verified hosts until they are within --threshold of each other."""
        limits = PlanLimits(balance_threshold=threshold)
        _cluster_goal(Goal.BALANCE, limits, dry_run, plan_file, (parallel, cluster_parallel),
                      postcopy, agent, credentials, as_json)  # fmt: skip

    @app.command("consolidate")
    def consolidate(
        dry_run: DryRunOpt = False,
        plan_file: PlanFileOpt = None,
        max_load: Annotated[
            float, typer.Option(min=0.05, max=1.0, help="Fill hosts up to this load (fraction).")
        ] = 0.85,
        parallel: ParallelOpt = 2,
        cluster_parallel: ClusterParallelOpt = 5,
        postcopy: PostcopyOpt = False,
        agent: VantageOpt = None,
        credentials: CredOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Pack VMs onto fewer verified hosts and name the hosts that can be powered down."""
        limits = PlanLimits(consolidate_max_load=max_load)
        _cluster_goal(Goal.CONSOLIDATE, limits, dry_run, plan_file,
                      (parallel, cluster_parallel), postcopy, agent, credentials,
                      as_json)  # fmt: skip

    @cluster_app.command("loads")
    def loads(
        agent: AgentOpt = None, credentials: CredOpt = None, as_json: JsonOpt = False
    ) -> None:
        """Every peer's measured load as the agent verified it (liars are quarantined)."""
        with one_line_errors(as_json):
            doc = run(call_agent(agent, credentials, "cluster.loads", {}))
            if as_json:
                print_json(doc)
                return
            _print_hosts(doc["hosts"])
            for h in doc["hosts"]:
                for v in (h.get("report") or {}).get("vms", []):
                    out.print(f"  {h['host']}/{v['name']}: {v['rss_mib']} MiB resident, "
                              f"{v['cpu_cores']} cores")  # fmt: skip


async def _evacuate(
    host: str, params: dict[str, Any], agent: str | None, creds: Path | None, as_json: bool
) -> dict[str, Any]:
    c = await connect(agent, creds)
    try:
        status = await c.call("ping", {}, timeout=30)
        if status.get("host") != host:
            raise CliError(f"the agent at --agent is {status.get('host')!r}, not {host!r}: "
                           f"connect to {host}'s own agent")  # fmt: skip
        with Progress(console=console, disable=as_json) as bar:
            task = bar.add_task(f"evacuate {host}", total=None)

            def event(ev: dict[str, Any]) -> None:
                if ev.get("event") != "evacuate":
                    return
                bar.update(task, total=ev["of"])
                if ev["state"] in ("completed", "failed"):
                    bar.advance(task)
                    console.print(f"  {ev['vm']} -> {ev['destination']}: {ev['state']}")

            return dict(await c.call("host.evacuate", params, on_event=event, timeout=None))
    finally:
        await c.close()


def _cluster_goal(
    goal: Goal, limits: PlanLimits, dry_run: bool, plan_file: Path | None,
    parallel: tuple[int, int], postcopy: bool, agent: str | None, creds: Path | None, as_json: bool,
) -> None:  # fmt: skip
    with one_line_errors(as_json):
        if parallel[0] > parallel[1]:
            raise CliError("--parallel (per host) must not exceed --cluster-parallel")
        caps = Caps(*parallel)
        saved = _read_plan(plan_file) if plan_file is not None else None
        if saved is not None and dry_run:
            raise CliError("--plan runs a saved plan: drop --dry-run to run it")
        options = {"mode": "postcopy" if postcopy else "precopy"}
        doc = run(_plan_and_run(goal, limits, saved, dry_run, caps, options, agent, creds,
                                as_json))  # fmt: skip
        if as_json:
            print_json(doc)
        else:
            _print_plan(doc)
            _print_outcomes(doc)
        if any(o["status"] != "completed" for o in doc.get("outcomes", [])):
            raise typer.Exit(1)


def _read_plan(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise CliError(f"--plan {path}: {e.strerror}") from None
    except ValueError as e:
        raise CliError(f"--plan {path} is not JSON ({e}): save --dry-run --json output") from None


async def _plan_and_run(
    goal: Goal, limits: PlanLimits, saved: Any, dry_run: bool, caps: Caps,
    options: dict[str, Any], agent: str | None, creds: Path | None, as_json: bool,
) -> dict[str, Any]:  # fmt: skip
    async def dial(address: str) -> Any:
        return await connect(address, creds)

    try:
        cluster = await gather(dial, resolve_agent(agent), options)
        if saved is None:
            p, doc = fresh_plan(cluster, goal, limits)
        else:
            p, doc = replayed_plan(cluster, saved, goal, limits)
    except PlacementError as e:
        raise CliError(str(e)) from None
    if dry_run:
        return doc
    with Progress(console=console, disable=as_json) as bar:
        task = bar.add_task(goal.value, total=len(p.moves))

        def event(ev: dict[str, Any]) -> None:
            if ev["state"] in ("completed", "failed", "skipped"):
                bar.advance(task)
                console.print(f"  {ev['vm']} {ev['source']} -> {ev['destination']}: {ev['state']}")

        doc["outcomes"] = await execute(dial, p, cluster.addresses, options, caps, event)
    return doc
