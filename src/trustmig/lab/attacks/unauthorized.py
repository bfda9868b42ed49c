"""Unauthorized migrations: who may start a migrate-out, and who may push a migrate-in.

Attempts: an unprivileged user asks the source to migrate a VM it does not operate; a host
unknown to the cluster (its certificate comes from another CA) and a host whose certificate was
revoked ask a destination to receive a VM. The baseline has no user or host identities at all:
whoever reaches QEMU's management socket or its incoming port is obeyed.
"""

from __future__ import annotations

import shutil
from typing import Any

from trustmig.agent.client import ControlClient, ControlError
from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.targets import HONEST, MALLORY, SOURCE, LabEnv, guest_spec
from trustmig.pki.authority import ClusterCA, Credentials
from trustmig.pki.tls import client_context
from trustmig.pki.trust import TrustBundle

NAME = "unauthorized"


async def baseline(env: LabEnv) -> Outcome:
    b = env.baseline
    # (1) migrate-out by anyone who reaches the management socket: no user, no role, no policy
    victim = await b.boot(NAME)
    thief, port = await b.destination(NAME)
    prog = await b.migrate(victim, port)
    await b.settle(thief)
    stolen = await b.state({"attacker host": thief})
    # (2) migrate-in from a host nobody enrolled: the waiting destination loads any stream
    waiting, wport = await b.destination(f"{NAME}-in")
    intruder = await b.boot(f"{NAME}-intruder")
    prog_in = await b.migrate(intruder, wport)
    pushed = await b.settle(waiting)
    out_ok = prog.status == "completed" and stolen["running_copies"] == 1
    in_ok = prog_in.status == "completed" and pushed == "running"
    return Outcome(
        compromised=out_ok or in_ok,
        outcome=f"unprivileged migrate-out {'succeeded' if out_ok else 'failed'} (the attacker's "
        f"host runs the victim with {stolen['checks'].get('attacker host', {}).get('marker_ok')}"
        f" secret pages); migrate-in from an unknown host {'succeeded' if in_ok else 'failed'}; "
        "a revoked host is indistinguishable from any other (no host identities)",
        evidence={
            "migrate_out_by_unprivileged": prog.status,
            "attacker_copy": stolen,
            "migrate_in_from_unknown_host": pushed,
            "revoked_host": "not applicable",
        },
        guest=stolen,
    )


async def _attempt(
    env: LabEnv, creds: Credentials, host: str, op: str, params: dict[str, Any]
) -> str | None:
    """Call ``op`` on ``host`` with ``creds``; the error line, or None if it was obeyed."""
    t = env.trustmig
    bundle = TrustBundle.load(t.cluster.root / "ca" / "ca.pem")
    try:
        c = await ControlClient.connect(
            t.cluster.hosts[host].control, client_context(creds, bundle)
        )
    except ControlError as e:
        return str(e)
    try:
        await c.call(op, params, timeout=30)
        return None
    except ControlError as e:
        return str(e)
    finally:
        await c.close()


def _prepare_params(name: str) -> dict[str, Any]:
    return {
        "migration_id": "00000000-0000-4000-8000-00000000dead",
        "spec": guest_spec(name).model_dump(mode="json", exclude={"image_key", "owner"}),
        "options": {},
        "user": {"name": "alice"},
        "policy": None,
        "audit_pub": "",
    }


async def trustmig(env: LabEnv) -> Outcome:
    t = env.trustmig
    work = env.workdir / "unauthorized"
    await t.boot(NAME)
    results: dict[str, str | None] = {}
    # (1) a user without the operator role asks for a migrate-out
    c = await t.client(SOURCE, MALLORY)
    try:
        try:
            await c.call("migrate", {"vm": NAME, "to": HONEST, "options": {}}, timeout=60)
            results["unprivileged user migrate-out"] = None
        except ControlError as e:
            results["unprivileged user migrate-out"] = str(e)
        events = (await c.call("audit.show", {"vm": NAME, "limit": 200}))["events"]
        verify = await c.call("audit.verify")
    finally:
        await c.close()
    # (2) a host with a certificate from another CA pushes a migrate-in
    foreign_ca = ClusterCA.init(work / "foreign-ca")
    foreign = foreign_ca.issue_host("host-z", work / "host-z")
    results["unknown host migrate-in"] = await _attempt(
        env, foreign, HONEST, "incoming.prepare", _prepare_params(NAME)
    )
    # (3) a host the cluster enrolled, then revoked
    ca = t.cluster.ca
    assert ca is not None
    revoked = ca.issue_host("host-x", work / "host-x")
    ca.revoke("host-x", "host")
    for hh in t.cluster.hosts.values():
        shutil.copy(ca.crl_path, hh.dir / "pki" / "crl.pem")
    results["revoked host migrate-in"] = await _attempt(
        env, revoked, HONEST, "incoming.prepare", _prepare_params(NAME)
    )
    results["revoked host asks the source"] = await _attempt(
        env, revoked, SOURCE, "migrate", {"vm": NAME, "to": HONEST}
    )
    guest = await t.state(NAME)
    obeyed = [k for k, v in results.items() if v is None]
    denials = [
        e for e in events if e.get("user") == MALLORY and e.get("outcome") in ("deny", "denied")
    ]
    return Outcome(
        compromised=bool(obeyed)
        or guest["running_copies"] != 1
        or guest["where"] != SOURCE
        or guest.get("pending_incoming", 0) > 0,
        outcome=("all refused: " if not obeyed else f"OBEYED {obeyed}; ")
        + "; ".join(f"{k}: {(v or 'obeyed')[:90]}" for k, v in results.items()),
        evidence={
            "attempts": results,
            "audit_denials_of_mallory": len(denials),
            "audit_chain_ok": verify.get("ok"),
        },
        guest=guest,
    )


ATTACK = Attack(
    name=NAME,
    title="Unauthorized migration (user, unknown host, revoked host)",
    paper="Without access control on migration operations an unprivileged user can migrate "
    "VMs out, and any host can initiate migrations into a victim hypervisor.",
    x805=(
        ("access_control", "services", "management"),
        ("access_control", "infrastructure", "control"),
        ("authentication", "services", "management"),
        ("authentication", "infrastructure", "control"),
        ("non_repudiation", "services", "management"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
