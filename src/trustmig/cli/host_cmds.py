"""`trustmig host init|enroll|enroll-tpm`: a host's first hour, one command per step.

``host init`` writes a complete, commented ``host.toml`` (every section, the values an
administrator changes first) and a default-deny host policy; ``host enroll`` issues the host's
identity and refuses a name the CA already issued unless ``--replace`` (which revokes the old
certificates); ``host enroll-tpm`` is the security admin's enrollment of the host's TPM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from trustmig.cli.common import CliError, one_line_errors, out, print_json

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
CaDirOpt = Annotated[Path, typer.Option("--ca-dir", help="Cluster CA directory.")]

HOST_TOML = """\
# trustmig host configuration (docs/operations.md explains every setting).
name = "{name}"                 # must equal the name in this host's certificate
state_dir = "."                  # journal, audit trail, keys, VM policies (mode 0700)

[control]                        # the control API (TLS 1.3, mutual certificates)
listen = "{control}"
# advertise = "mgmt.example:7000"

[data]                           # the migration data channel (attested, encrypted)
listen = "{data}"
# advertise = "10.0.1.5:7001"    # the address peers connect to, on the migration network

[pki]                            # written by 'trustmig host enroll'
cert = "pki/host.pem"
key = "pki/host.key"
ca = "pki/ca.pem"
crl = "pki/crl.pem"              # required: the agent never runs without revocation checking

[qemu]
binary = "qemu-system-x86_64"
accel = "auto"                   # kvm where usable, tcg otherwise (with a warning)

[attestation]
enabled = true
tpm = "auto"                     # /dev/tpmrm0, or a per-host swtpm under the state dir
refvalues = "refvalues.json"     # signed by the CA: 'trustmig refvalues add'
registry = "ak-registry.json"    # enrolled AKs: 'trustmig host enroll-tpm'

[labels]                         # what VM policies select on; measured (PCR 12)
country = "{country}"
security_level = 1

[agent]
on_shutdown = "keep"             # keep guests running for the next agent, or "stop"
audit_witness_interval_s = 30

[migration]
peer_grace_s = 60
orphan_timeout_s = 300
commit_timeout_s = 30

[admission]                      # limits: change freely, nothing to reseal
max_outbound_per_host = 2
max_inbound_per_host = 2
max_per_tenant = 2
max_per_vm_per_hour = 4

[guard]                          # connection limits; the allow lists are measured
max_half_open = 64

# one section per peer this host may migrate with:
# [peers.host-b]
# control = "10.0.0.6:7000"
# labels = {{ country = "{country}", security_level = 1 }}
"""

HOST_POLICY = """\
# What this host accepts (default deny: empty lists accept nothing). See docs/policy.md.
host = "{name}"

[labels]
country = "{country}"
security_level = 1

[accept]
sources = []                     # peer host names, or ["*"]
tenants = []                     # tenants whose VMs may come here
require_signed_vm_policy = true
"""


def host_init(
    name: str,
    directory: Annotated[Path, typer.Option("--dir", help="Where to write host.toml.")],
    control: Annotated[str, typer.Option(help="Control API listen address.")] = "0.0.0.0:7000",
    data: Annotated[str, typer.Option(help="Data channel listen address.")] = "0.0.0.0:7001",
    country: Annotated[str, typer.Option(help="ISO country code label.")] = "DE",
    force: Annotated[bool, typer.Option(help="Overwrite an existing host.toml.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a complete host.toml and a default-deny host policy for a new host."""
    from trustmig.config import load_config
    from trustmig.pki.identity import check_host_name

    with one_line_errors(as_json):
        check_host_name(name)
        cfg_path = directory / "host.toml"
        if cfg_path.exists() and not force:
            raise CliError(f"{cfg_path} exists: pass --force to overwrite it")
        (directory / "policies").mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg_path.write_text(HOST_TOML.format(name=name, control=control, data=data,
                                             country=country))  # fmt: skip
        policy = directory / "policies" / "host.toml"
        if not policy.exists():
            policy.write_text(HOST_POLICY.format(name=name, country=country))
        load_config(cfg_path)  # what we wrote must load
        steps = [
            f"trustmig host enroll {name} --ca-dir CA_DIR --out {directory / 'pki'}",
            f"trustmig host enroll-tpm --config {cfg_path}",
            f"trustmig refvalues add --from-host-config {cfg_path} --ca-dir CA_DIR",
            f"trustmig agent --config {cfg_path}",
        ]
        data_out: dict[str, Any] = {"config": str(cfg_path), "host_policy": str(policy),
                                    "next": steps}  # fmt: skip
        if as_json:
            print_json(data_out)
            return
        out.print(escape(f"wrote {cfg_path} and {policy}; next:"))
        for s in steps:
            out.print(f"  {escape(s)}")


def host_enroll(
    name: str,
    ca_dir: CaDirOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write host.key/host.pem.")],
    ip: Annotated[list[str] | None, typer.Option(help="IP SAN (repeatable).")] = None,
    replace: Annotated[
        bool, typer.Option(help="Re-key an enrolled host: its old certificates are revoked.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Issue a host identity (key + certificate naming the host)."""
    from trustmig.pki.authority import ClusterCA

    with one_line_errors(as_json):
        ca = ClusterCA.load(ca_dir)
        live = [r for r in ca.issued() if r["kind"] == "host" and r["name"] == name
                and not r["revoked"]]  # fmt: skip
        revoked: list[int] = []
        if live and not replace:
            raise CliError(
                f"host {name} is already enrolled (serial {int(live[-1]['serial']):x}): pass "
                "--replace to issue a new identity and revoke the old one, then push the CRL "
                "('trustmig crl push')"
            )
        if live:
            revoked = ca.revoke(name, "host")
        creds = ca.issue_host(name, out_dir, ips=ip or ())
        data = {"host": name, "cert": str(creds.cert_path), "key": str(creds.key_path),
                "revoked_serials": [hex(s) for s in revoked]}  # fmt: skip
        note = f"; revoked {len(revoked)} old certificate(s): push the CRL" if revoked else ""
        print_json(data) if as_json else out.print(
            escape(f"host {name} enrolled: {creds.cert_path}{note}")
        )


def host_enroll_tpm(
    config: Annotated[Path, typer.Option("--config", help="The host's host.toml.")],
    replace: Annotated[
        bool, typer.Option(help="Accept a different TPM (replaced hardware) for this host.")
    ] = False,
    ek_ca: Annotated[
        list[Path] | None, typer.Option("--ek-ca", help="TPM vendor CA (PEM) the EK must chain to.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Enroll the host's TPM attestation key (security admin; the agent must be stopped)."""
    from trustmig.agent.attestation import AgentAttestation
    from trustmig.config import load_config

    with one_line_errors(as_json):
        cfg = load_config(config)
        cas = [p.read_bytes() for p in ek_ca] if ek_ca else None
        res = AgentAttestation.enroll_tpm(cfg, replace=replace, ek_ca_certs=cas)
        reg = res["registry"]
        line = f"host {res['host']}: AK {res['ak_name'][:16]} enrolled in {reg}; give it to peers"
        print_json(res) if as_json else out.print(escape(line))


def register(host_app: typer.Typer) -> None:
    host_app.command("init")(host_init)
    host_app.command("enroll")(host_enroll)
    host_app.command("enroll-tpm")(host_enroll_tpm)
