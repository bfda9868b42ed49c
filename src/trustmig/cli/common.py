"""Shared CLI plumbing: reaching an agent as a user, printing results, one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from trustmig.agent.client import ControlClient
from trustmig.pki.authority import Credentials
from trustmig.pki.tls import client_context
from trustmig.pki.trust import TrustBundle

console = Console(stderr=True)
out = Console()
T = TypeVar("T")


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def fail(msg: str, *, as_json: bool = False, code: int = 1) -> NoReturn:
    if as_json:
        print(json.dumps({"status": "error", "error": msg}))
    else:
        # one line, whatever the terminal width, and the message's brackets shown as they are
        console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)
    raise SystemExit(code)


@contextmanager
def one_line_errors(as_json: bool) -> Iterator[None]:
    """Turn every known failure into one line (``error: ...`` or JSON) and exit status 1."""
    from trustmig.agent.client import ControlError
    from trustmig.attest.errors import AttestError
    from trustmig.audit import AuditError
    from trustmig.config import ConfigError
    from trustmig.hypervisor.image import ImageBuildError
    from trustmig.netns.enter import NetnsError
    from trustmig.netns.topology import TopologyError
    from trustmig.pki.errors import PkiError
    from trustmig.policy import PolicyError

    try:
        yield
    except (
        CliError,
        ControlError,
        ConfigError,
        ImageBuildError,
        PkiError,
        PolicyError,
        AuditError,
        AttestError,
        NetnsError,
        TopologyError,
        OSError,
        ValueError,
    ) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__, as_json=as_json)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def resolve_agent(agent: str | None) -> str:
    addr = agent or os.environ.get("TRUSTMIG_AGENT")
    if not addr:
        raise CliError("no agent address: pass --agent HOST:PORT or set TRUSTMIG_AGENT")
    return addr


def resolve_credentials(creds: Path | None) -> Credentials:
    d = creds or (
        Path(os.environ["TRUSTMIG_CREDENTIALS"]) if "TRUSTMIG_CREDENTIALS" in os.environ else None
    )
    if d is None:
        raise CliError(
            "no credentials: pass --credentials DIR (from 'trustmig user add') "
            "or set TRUSTMIG_CREDENTIALS"
        )
    return Credentials.in_dir(d, "user")


async def connect(agent: str | None, creds: Path | None) -> ControlClient:
    c = resolve_credentials(creds)
    bundle = TrustBundle.load(c.ca_path, c.crl_path if c.crl_path.exists() else None)
    return await ControlClient.connect(resolve_agent(agent), client_context(c, bundle))


async def call_agent(
    agent: str | None, creds: Path | None, op: str, params: dict[str, Any], timeout: float = 120
) -> Any:
    """One call on a fresh connection, closed afterwards."""
    c = await connect(agent, creds)
    try:
        return await c.call(op, params, timeout=timeout)
    finally:
        await c.close()


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


class MigrationProgressView:
    """Rich progress bar fed by the agent's progress events."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.disk_task: TaskID | None = None

    def __enter__(self) -> MigrationProgressView:
        if self.enabled:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>5.1f}%"),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("migrating", total=100, detail="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress.stop()

    def _disk(self, ev: dict[str, Any]) -> None:
        """Disks copy before memory: a bar of their own, per disk in the detail."""
        assert self.progress is not None
        total = max(1, int(ev.get("total") or 1))
        done = int(ev.get("transferred") or 0)
        if self.disk_task is None:
            self.disk_task = self.progress.add_task("disks", total=100, detail="")
        mib = 1024 * 1024
        per = ", ".join(f"{d} {a // mib}/{b // mib} MiB"
                        for d, (a, b) in sorted((ev.get("disks") or {}).items()))  # fmt: skip
        self.progress.update(self.disk_task, completed=100.0 * done / total, detail=per)

    def event(self, ev: dict[str, Any]) -> None:
        if not self.progress or self.task is None:
            if not self.enabled and ev.get("event") == "phase" and sys.stderr.isatty():
                console.print(f"  phase: {ev.get('phase')}")
            return
        if ev.get("event") == "phase":
            self.progress.update(self.task, description=str(ev.get("phase")))
        elif ev.get("event") == "disk-progress":
            self._disk(ev)
        elif ev.get("event") == "progress":
            total = max(1, int(ev.get("total") or 1))
            remaining = int(ev.get("remaining") or 0)
            done = 100.0 * (total - remaining) / total
            mib = 1024 * 1024
            detail = (
                f"sent {int(ev.get('transferred', 0)) // mib} MiB, "
                f"left {remaining // mib} MiB, round {ev.get('rounds')}, "
                f"dirty {ev.get('dirty_rate_pps', 0) * 4 // 1024} MiB/s, "
                f"exp. downtime {ev.get('expected_downtime_ms')} ms"
            )
            self.progress.update(self.task, completed=done, detail=detail)


def on_event(view: MigrationProgressView) -> Callable[[dict[str, Any]], None]:
    return view.event
