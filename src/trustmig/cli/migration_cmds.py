"""`trustmig migration list|show|resolve`: a host's migrations and settling one left in doubt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from trustmig.cli.common import call_agent, one_line_errors, out, print_json, run

migration_app = typer.Typer(no_args_is_help=True, help="Migrations of a host.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
AgentOpt = Annotated[
    str | None,
    typer.Option("--agent", help="Agent control address HOST:PORT (default: $TRUSTMIG_AGENT)."),
]
CredOpt = Annotated[
    Path | None,
    typer.Option("--credentials", help="User credentials dir (default: $TRUSTMIG_CREDENTIALS)."),
]

GUIDANCE = {
    "committing": "the destination did not confirm yet; 'resolve --keep retry' asks it again",
    "awaiting-peer": "waiting for the destination agent; 'resolve --keep retry' asks it again",
    "postcopy-paused": "the post-copy stream is broken; 'resolve --keep retry' recovers it",
    "postcopy-switching": "QEMU is switching to post-copy; it settles by itself",
}


@migration_app.command("list")
def migration_list(
    agent: AgentOpt = None, credentials: CredOpt = None, limit: int = 50, as_json: JsonOpt = False
) -> None:
    """Migrations this host takes part in, newest first."""
    with one_line_errors(as_json):
        res = run(call_agent(agent, credentials, "migration.list", {"limit": limit}))
        if as_json:
            print_json(res)
            return
        t = Table("migration", "role", "vm", "peer", "state", "mode", "error", title=res["host"])
        for m in res["migrations"]:
            t.add_row(m["migration_id"][:8], m["role"], m["vm"], m["peer"], m["state"],
                      str(m.get("mode")), escape(str(m.get("error") or ""))[:60])  # fmt: skip
        out.print(t)


@migration_app.command("show")
def migration_show(
    migration_id: str, agent: AgentOpt = None, credentials: CredOpt = None,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """One migration: its state, its history, and what to do if it is in doubt."""
    with one_line_errors(as_json):
        res = run(call_agent(agent, credentials, "migration.show", {"migration_id": migration_id}))
        if as_json:
            print_json(res)
            return
        t = Table("field", "value", title=f"migration {migration_id}")
        for k in ("role", "vm", "peer", "state", "epoch", "mode", "channel", "user", "error"):
            t.add_row(k, escape(str(res.get(k))))
        out.print(t)
        hint = GUIDANCE.get(str(res.get("state")))
        if hint and res.get("role") == "source":
            out.print(escape(hint))


@migration_app.command("resolve")
def migration_resolve(
    migration_id: str,
    keep: Annotated[
        str,
        typer.Option(
            help="retry: settle it automatically now; destination: the destination's copy is "
            "the VM; source: the destination's copy is known gone, run the source's."
        ),
    ] = "retry",
    agent: AgentOpt = None,
    credentials: CredOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Settle a migration left in doubt on its source host (operator or security-admin; audited)."""
    with one_line_errors(as_json):
        res = run(call_agent(agent, credentials, "migration.resolve",
                        {"migration_id": migration_id, "keep": keep}))  # fmt: skip
        if as_json:
            print_json(res)
            return
        out.print(f"migration {migration_id}: resolved with keep={keep}, now {res.get('state')}")
