"""`trustmig evacuate HOST` and `trustmig cluster loads`: automatic migration on verified facts.

Evacuate asks HOST's own agent (``--agent``) to plan and run its evacuation: the agent judges
every peer's measured, signed and TPM-quoted load, quarantines a peer that lies, asks each VM's
policy which peers it may go to (with the caller as the user), and migrates each VM through the
ordinary, attested migration path, at most ``--parallel`` at a time. ``--dry-run`` prints the
plan only.
"""

from __future__ import annotations

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
    run,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
AgentOpt = Annotated[
    str | None,
    typer.Option("--agent", help="HOST's agent control address (default: $TRUSTMIG_AGENT)."),
]
CredOpt = Annotated[
    Path | None,
    typer.Option("--credentials", help="User credentials dir (default: $TRUSTMIG_CREDENTIALS)."),
]


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
    t = Table("vm", "to", "why", title=f"evacuate {doc['host']}: {len(doc['moves'])} moves")
    for m in doc["moves"]:
        t.add_row(m["vm"], m["destination"], escape(m["why"]))
    out.print(t)
    for s in doc["stuck"]:
        out.print(f"[yellow]stays[/] {s['vm']} ({s['code']}): {escape(s['why'])}")
    b, a = doc["before"], doc["after"]
    out.print(f"hosts in use {b['hosts_in_use']} -> {a['hosts_in_use']}; "
              f"imbalance {b['imbalance']} -> {a['imbalance']}")  # fmt: skip


def _print_outcomes(doc: dict[str, Any]) -> None:
    for o in doc.get("outcomes", []):
        if o["status"] == "completed":
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
