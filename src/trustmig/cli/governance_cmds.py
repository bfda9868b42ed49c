"""`trustmig policy|audit|guard ...` commands."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table

from trustmig.cli.common import CliError, connect, one_line_errors, out, print_json, run

policy_app = typer.Typer(no_args_is_help=True, help="VM and host migration policies.")
audit_app = typer.Typer(no_args_is_help=True, help="The signed, hash-chained audit trail.")
guard_app = typer.Typer(no_args_is_help=True, help="Connection guard and admission control.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
AgentOpt = Annotated[str | None, typer.Option("--agent", help="Agent control address.")]
CredOpt = Annotated[Path | None, typer.Option("--credentials", help="User credentials dir.")]


def _call(op: str, params: dict[str, Any], agent: str | None, creds: Path | None) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        c = await connect(agent, creds)
        try:
            return await c.call(op, params, timeout=300)
        finally:
            await c.close()

    return run(go())


def _guarded(as_json: bool, fn: Any) -> None:
    with one_line_errors(as_json):
        fn()


# ------------------------------------------------------------------------------ policy
@policy_app.command("check")
def policy_check(
    path: Path,
    ca: Annotated[
        Path | None, typer.Option("--ca", help="Cluster ca.pem: verify a signed policy with it.")
    ] = None,
    crl: Annotated[Path | None, typer.Option("--crl", help="The cluster's crl.pem.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate a VM or host policy file (TOML/YAML), or verify a signed policy JSON."""
    from trustmig.pki.trust import TrustBundle
    from trustmig.policy import check_policy_file

    def go() -> None:
        verify = None
        if ca is not None:
            bundle = TrustBundle.load(ca, crl)
            verify = lambda der: bundle.verify(der, kind="user")  # noqa: E731
        elif path.suffix.lower() == ".json":
            raise CliError(
                f"{path} is a signed policy: pass --ca ca.pem (and --crl crl.pem) to verify its "
                "signature; nothing was checked"
            )
        summary = check_policy_file(path, verify)
        print_json({"ok": True, "file": str(path), "summary": summary}) if as_json else out.print(
            f"[green]ok[/] {escape(str(path))}: {escape(str(summary))}"
        )

    _guarded(as_json, go)


@policy_app.command("sign")
def policy_sign(
    path: Path,
    credentials: Annotated[Path, typer.Option("--credentials", help="Signer's credentials.")],
    output: Annotated[
        Path | None, typer.Option("--out", help="Write the signed JSON here.")
    ] = None,
) -> None:
    """Sign a VM policy with your user key (as its owner or a security-admin)."""
    from trustmig.pki.authority import Credentials
    from trustmig.policy import parse_vm_policy, sign_policy

    def go() -> None:
        text = path.read_text()
        fmt: Literal["toml", "yaml"] = "yaml" if path.suffix in (".yaml", ".yml") else "toml"
        parse_vm_policy(text, source=str(path), fmt=fmt)
        c = Credentials.in_dir(credentials, "user")
        sp = sign_policy(text, fmt, c.name(), c.cert_der(), c.load_key())
        data = sp.to_json()
        if output:
            output.write_text(data)
            out.print(f"signed policy written to {output}")
        else:
            sys.stdout.write(data + "\n")

    _guarded(False, go)


@policy_app.command("set")
def policy_set(
    vm: str,
    signed: Path,
    agent: AgentOpt = None,
    credentials: CredOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Provision a signed VM policy on the agent that owns the VM."""

    def go() -> None:
        res = _call("policy.set", {"vm": vm, "policy": signed.read_text()}, agent, credentials)
        print_json(res) if as_json else out.print(
            f"policy for {vm} set (signed by {res['signed_by']})"
        )

    _guarded(as_json, go)


@policy_app.command("show")
def policy_show(
    vm: str, agent: AgentOpt = None, credentials: CredOpt = None, as_json: JsonOpt = False
) -> None:
    """Show the verified policy of a VM."""

    def go() -> None:
        res = _call("policy.show", {"vm": vm}, agent, credentials)
        print_json(res) if as_json else out.print_json(json.dumps(res))

    _guarded(as_json, go)


# ------------------------------------------------------------------------------ audit
def _offline_log(state_dir: Path) -> tuple[Any, Any]:
    from trustmig.agent.governance import audit_url
    from trustmig.audit import AuditLog

    cfg_path = state_dir / "host.toml"
    host = tomllib.loads(cfg_path.read_text())["name"] if cfg_path.exists() else state_dir.name
    pub_path = state_dir / "keys" / "audit.pub"
    if not (state_dir / "audit.db").exists():
        raise CliError(f"{state_dir}/audit.db not found: pass a host's state dir")
    if not pub_path.exists():
        raise CliError(f"{pub_path} not found: the audit public key is needed to verify")
    from cryptography.hazmat.primitives import serialization

    pub = serialization.load_pem_public_key(pub_path.read_bytes())
    return AuditLog(audit_url(state_dir), host=host, signing_key=None), pub


StateOpt = Annotated[
    Path | None, typer.Option("--state-dir", help="Read a host's state dir directly (offline).")
]


@audit_app.command("show")
def audit_show(
    vm: Annotated[str | None, typer.Option(help="Only this VM.")] = None,
    limit: int = 200,
    state_dir: StateOpt = None,
    agent: AgentOpt = None,
    credentials: CredOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show audit events (newest last)."""

    def go() -> None:
        if state_dir:
            log, _ = _offline_log(state_dir)
            events = [e.to_json() for e in log.events(vm=vm, limit=limit)]
            log.close()
        else:
            events = _call("audit.show", {"vm": vm, "limit": limit}, agent, credentials)["events"]
        if as_json:
            print_json({"events": events})
            return
        t = Table("seq", "time", "kind", "vm", "user", "outcome", "detail")
        for e in events:
            d = e.get("data") or {}
            t.add_row(
                str(e["seq"]),
                e["ts"][11:23],
                e["kind"],
                str(e.get("vm") or ""),
                str(e.get("user") or ""),
                str(e.get("outcome") or ""),
                str(d.get("line") or d.get("reason") or "")[:80],
            )
        out.print(t)

    _guarded(as_json, go)


@audit_app.command("export")
def audit_export(
    state_dir: StateOpt = None, agent: AgentOpt = None, credentials: CredOpt = None
) -> None:
    """Export the whole trail as JSON lines."""

    def go() -> None:
        if state_dir:
            log, _ = _offline_log(state_dir)
            log.export_jsonl(sys.stdout)
            log.close()
        else:
            for e in _call("audit.export", {}, agent, credentials)["events"]:
                sys.stdout.write(json.dumps(e, sort_keys=True) + "\n")

    _guarded(False, go)


@audit_app.command("verify")
def audit_verify(
    state_dir: StateOpt = None,
    agent: AgentOpt = None,
    credentials: CredOpt = None,
    strict: bool = False,
    as_json: JsonOpt = False,
) -> None:
    """Verify the chain and signed checkpoints; exit 1 naming every bad entry."""

    def go() -> None:
        if state_dir:
            log, pub = _offline_log(state_dir)
            rep = log.verify(pub, strict=strict).__dict__
            log.close()
        else:
            rep = _call("audit.verify", {}, agent, credentials)
        if as_json:
            print_json(rep)
        else:
            status = "[green]intact[/]" if rep["ok"] else "[red]TAMPERED[/]"
            out.print(
                f"audit trail {status}: {rep['events']} events, "
                f"{rep['checkpoints']} signed checkpoints"
            )
            if rep.get("anchor"):
                out.print(f"  anchor: {escape(rep['anchor']['code'])}: "
                          f"{escape(rep['anchor']['detail'])}")  # fmt: skip
            for p in rep["problems"]:
                out.print(f"  [red]problem:[/] {escape(p)}")
            for w in rep["warnings"]:
                out.print(f"  [yellow]warning:[/] {escape(w)}")
        if not rep["ok"]:
            raise typer.Exit(1)

    _guarded(as_json, go)


# ------------------------------------------------------------------------------ guard
@guard_app.command("show")
def guard_show(
    agent: AgentOpt = None, credentials: CredOpt = None, as_json: JsonOpt = False
) -> None:
    """Tracked connections, rule hit counters and admission queues of an agent."""

    def go() -> None:
        res = _call("guard.show", {}, agent, credentials)
        print_json(res) if as_json else out.print_json(json.dumps(res, default=str))

    _guarded(as_json, go)


@guard_app.command("quarantine")
def guard_quarantine(
    agent: AgentOpt = None, credentials: CredOpt = None, as_json: JsonOpt = False
) -> None:
    """Hosts this agent refuses as destinations because they lied, and who cleared whom."""

    def go() -> None:
        res = _call("guard.quarantine", {}, agent, credentials)
        if as_json:
            print_json(res)
            return
        if not res["quarantined"]:
            out.print(f"{res['host']}: no host is quarantined")
        for host, entry in res["quarantined"].items():
            out.print(f"[red]{escape(host)}[/] quarantined: {escape(str(entry['reason']))}")

    _guarded(as_json, go)


@guard_app.command("clear")
def guard_clear(
    host: str, agent: AgentOpt = None, credentials: CredOpt = None, as_json: JsonOpt = False
) -> None:
    """Lift a host's quarantine (security-admin only; the audit trail names who did)."""

    def go() -> None:
        res = _call("guard.clear", {"host": host}, agent, credentials)
        print_json(res) if as_json else out.print(f"[green]cleared[/] {host} on {res['host']}")

    _guarded(as_json, go)


@guard_app.command("nft")
def guard_nft(
    config: Annotated[Path, typer.Option("--config", help="host.toml")], as_json: JsonOpt = False
) -> None:
    """Render nftables rules for this host's migration ports from its guard rules."""
    from trustmig.config import load_config, parse_hostport
    from trustmig.guard import GuardRules, render_nft

    def go() -> None:
        cfg = load_config(config)
        rules = GuardRules(**cfg.guard)
        cport = parse_hostport(cfg.control.listen)[1]
        dport = parse_hostport(cfg.data.listen)[1]
        text = render_nft(rules, control_port=cport, data_port=dport)
        print_json({"nft": text}) if as_json else sys.stdout.write(text)

    _guarded(as_json, go)
