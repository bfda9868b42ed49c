"""`trustmig refvalues ...` and the attestation side of `trustmig host ...`.

Reference values are approved by the security admin with the cluster CA key; nothing here asks
a running agent: agents re-read the signed file when it changes, and `host status`/`host reseal`
work on the host's state directory (reseal requires the agent to be stopped).

Plugged into the main CLI with ``register(app, host_app)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from rich.console import Console
from rich.table import Table

from trustmig.cli.common import CliError, one_line_errors

refvalues_app = typer.Typer(
    no_args_is_help=True, help="Reference values: measurements approved by the security admin."
)

_out = Console()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
CaDirOpt = Annotated[Path, typer.Option("--ca-dir", help="Cluster CA directory (ca.key, ca.pem).")]
FileOpt = Annotated[
    Path | None,
    typer.Option("--file", help="Signed reference-value file (default: the host's, if known)."),
]
ConfigOpt = Annotated[Path, typer.Option("--config", help="The host's host.toml.")]


_Fail = CliError
_errors = one_line_errors


def _emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps({"status": "ok", **data}, indent=2, default=str))
    else:
        _out.print(text, highlight=False, soft_wrap=True)


def _ca_private_key(ca_dir: Path) -> ec.EllipticCurvePrivateKey:
    from trustmig.pki.authority import ClusterCA

    return ClusterCA.load(ca_dir).ca_key


def _ca_public_key(ca_dir: Path) -> ec.EllipticCurvePublicKey:
    path = ca_dir / "ca.pem"
    try:
        key = x509.load_pem_x509_certificate(path.read_bytes()).public_key()
    except FileNotFoundError:
        raise _Fail(f"{path} not found; pass the cluster CA directory with --ca-dir") from None
    except ValueError:
        raise _Fail(f"{path} is not a PEM certificate; pass the cluster CA directory") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _Fail(f"{path} does not hold an ECDSA key; it is not a trustmig cluster CA")
    return key


def _refvalues_file(file: Path | None, config: Path | None) -> Path:
    if file is not None:
        return file
    if config is not None:
        from trustmig.config import load_config

        return load_config(config).attestation.refvalues
    raise _Fail("no reference-value file: pass --file PATH")


# ---------------------------------------------------------------------------------- refvalues
@refvalues_app.command("add")
def refvalues_add(
    ca_dir: CaDirOpt,
    name: Annotated[str | None, typer.Argument(help="Measurement name, e.g. qemu-binary.")] = None,
    digest: Annotated[str | None, typer.Argument(help="sha256 hex (64 characters).")] = None,
    comment: Annotated[str, typer.Option("--comment", help="Why it is approved.")] = "",
    file: FileOpt = None,
    from_host_config: Annotated[
        Path | None,
        typer.Option("--from-host-config", help="Approve every measurement of this host.toml."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve a measurement (NAME DIGEST) or all measurements of a host, and re-sign the file."""
    from trustmig.agent.provisioning import add_refvalues, measure_host_software
    from trustmig.config import load_config

    with _errors(as_json):
        path = _refvalues_file(file, from_host_config)
        if from_host_config is not None:
            if name is not None or digest is not None:
                raise _Fail("pass either NAME DIGEST or --from-host-config, not both")
            cfg = load_config(from_host_config)
            entries = [
                (n, d, comment or (f"{cfg.name}: {detail}" if n == "agent-config" else detail))
                for n, d, detail in measure_host_software(cfg, from_host_config)
            ]
        elif name is None or digest is None:
            raise _Fail("pass NAME DIGEST (sha256 hex) or --from-host-config host.toml")
        else:
            entries = [(name, digest, comment)]
        added = add_refvalues(path, _ca_private_key(ca_dir), entries)
        data = {
            "file": str(path),
            "added": [
                {"name": e.name, "digest": e.digest_hex, "comment": e.comment} for e in added
            ],
        }
        _emit(
            data,
            as_json,
            "\n".join(f"approved {e.name} sha256:{e.digest_hex[:16]} in {path}" for e in added),
        )


@refvalues_app.command("list")
def refvalues_list(
    ca_dir: CaDirOpt,
    file: FileOpt = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Use this host's reference-value file.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List approved measurements (the file's signature is verified with the CA certificate)."""
    from trustmig.agent.provisioning import load_refvalues

    with _errors(as_json):
        path = _refvalues_file(file, config)
        rv = load_refvalues(path, _ca_public_key(ca_dir))
        entries = [
            {"name": e.name, "digest": e.digest_hex, "comment": e.comment} for e in rv.list()
        ]
        if as_json:
            _emit({"file": str(path), "entries": entries}, True, "")
            return
        table = Table(title=str(path))
        for col in ("name", "sha256", "comment"):
            table.add_column(col)
        for e in entries:
            table.add_row(e["name"], e["digest"], e["comment"])
        _out.print(table)


@refvalues_app.command("remove")
def refvalues_remove(
    name: str,
    digest: str,
    ca_dir: CaDirOpt,
    file: FileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Withdraw approval of one measurement and re-sign the file."""
    from trustmig.agent.provisioning import remove_refvalue

    with _errors(as_json):
        path = _refvalues_file(file, None)
        remove_refvalue(path, _ca_private_key(ca_dir), name, digest)
        _emit(
            {"file": str(path), "removed": {"name": name, "digest": digest.lower()}},
            as_json,
            f"removed {name} sha256:{digest.lower()[:16]} from {path}",
        )


# ---------------------------------------------------------------------------------- host
def host_reseal(config: ConfigOpt, ca_dir: CaDirOpt, as_json: JsonOpt = False) -> None:
    """After an approved upgrade (agent stopped): re-seal the host's keys to the new software."""
    from trustmig.agent.attestation import AgentAttestation
    from trustmig.config import load_config

    with _errors(as_json):
        cfg = load_config(config)
        res = AgentAttestation.reseal(
            cfg, config_path=config, ca_private_key=_ca_private_key(ca_dir)
        )
        names = ", ".join(res["resealed"]) or "no keys"
        _emit(res, as_json, f"host {cfg.name}: resealed {names} to PCRs 11+12 of the new launch")


def host_status(config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """Attestation state of a host from its state directory (works with the agent running)."""
    from trustmig.agent.attestation import offline_status
    from trustmig.config import load_config

    with _errors(as_json):
        st = offline_status(load_config(config))
        if as_json:
            _emit(st, True, "")
            return
        ak = st["ak"]
        lines = [
            f"host {st['host']} (agent {'running' if st['running'] else 'stopped'}), "
            f"TPM {st['tpm']['kind'] or 'never opened'}",
            f"AK {ak['name'] or '-'} fingerprint {ak['fingerprint'] or '-'} "
            f"({'enrolled' if ak['enrolled'] else 'NOT enrolled'} in {ak['registry']})",
        ]
        lines += [f"PCR {p}: {v}" for p, v in st["pcrs"].items()]
        lines += [
            f"  pcr {e['pcr']} {e['name']} sha256:{e['digest'][:16]} {e['detail']}"
            for e in st["event_log"]
        ]
        lines += [
            f"key {k['name']}: sealed={k['sealed']} recovery={k['recovery']} pcrs={k['pcrs']}"
            for k in st["sealed_keys"]
        ]
        lines += [
            f"peer {p}: {'ok' if r['ok'] else 'REFUSED'} {r['summary']}"
            for p, r in st["last_results"].items()
        ]
        _out.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer, host_app: typer.Typer) -> None:
    """Add `trustmig refvalues add|list|remove` and `trustmig host reseal|status`."""
    app.add_typer(refvalues_app, name="refvalues")
    host_app.command("reseal")(host_reseal)
    host_app.command("status")(host_status)
