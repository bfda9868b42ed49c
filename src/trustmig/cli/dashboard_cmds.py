"""`trustmig dashboard`: the cluster live in a browser, as the operator (read-only by default)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from trustmig.cli.common import (
    CliError,
    connect,
    one_line_errors,
    out,
    print_json,
    resolve_agent,
    resolve_credentials,
    run,
)
from trustmig.config import parse_hostport


def register(app: typer.Typer) -> None:
    @app.command("dashboard")
    def dashboard(
        agent: Annotated[
            list[str] | None,
            typer.Option(
                "--agent",
                help="An agent's control address (repeat; peers are found "
                "from each agent's status; default: $TRUSTMIG_AGENT).",
            ),
        ] = None,
        credentials: Annotated[
            Path | None, typer.Option(help="Your user credentials dir ($TRUSTMIG_CREDENTIALS).")
        ] = None,
        listen: Annotated[str, typer.Option(help="Loopback HOST:PORT to serve on.")] = (
            "127.0.0.1:8470"
        ),
        interval: Annotated[
            float, typer.Option(min=0.2, max=60, help="Seconds between two refreshes.")
        ] = 1.0,
        allow_actions: Annotated[
            bool, typer.Option(help="Offer migrate, evacuate and clear-quarantine forms.")
        ] = False,
        lab_report: Annotated[
            Path | None, typer.Option(help="Show this `trustmig lab run --output` report.")
        ] = None,
        as_json: Annotated[
            bool, typer.Option("--json", help="Print the cluster's state once as JSON; no server.")
        ] = False,
    ) -> None:
        """Serve a live view of hosts, VMs, migrations, audit and guard on a loopback address."""
        with one_line_errors(as_json):
            addresses = agent or [resolve_agent(None)]
            host, port = parse_hostport(listen, "--listen")
            user = resolve_credentials(credentials).name()
            run(_dashboard(addresses, credentials, host, port, user, interval, allow_actions,
                           lab_report, as_json))  # fmt: skip


async def _dashboard(
    addresses: list[str], creds: Path | None, host: str, port: int, user: str, interval: float,
    allow_actions: bool, lab_report: Path | None, as_json: bool,
) -> None:  # fmt: skip
    from trustmig.dashboard import ClusterReader, Dashboard, DashboardError, serve

    async def dial(address: str) -> Any:
        return await connect(address, creds)

    reader = ClusterReader(dial, addresses)
    dash = Dashboard(reader, user=user, interval_s=interval, allow_actions=allow_actions,
                     lab_report=lab_report)  # fmt: skip
    if as_json:
        try:
            await reader.round()
            await reader.round()  # the first round found the peers; this one reads them
            print_json(dash.view())
        finally:
            await dash.close()
        return

    def ready(url: str) -> None:
        out.print(f"dashboard of the cluster as {user}: {url} (Ctrl-C stops it)")
        if os.environ.get("TRUSTMIG_DASHBOARD_URL_FILE"):
            Path(os.environ["TRUSTMIG_DASHBOARD_URL_FILE"]).write_text(url)

    try:
        await serve(dash, host, port, ready)
    except DashboardError as e:
        raise CliError(str(e)) from None
