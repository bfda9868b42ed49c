"""Control-plane trespass: the other tenant, the self-made owner, the old policy, the stranger
host and the revoked user who is still connected.

Attempts against one victim VM of tenant acme, owned by alice:

- cross-tenant: an operator of tenant "evil" stops and migrates it;
- ownership hijack: another owner of the same tenant signs a policy naming himself the owner;
- policy rollback: after alice signed a newer policy that forbids a destination, the older,
  more permissive one is set again and the migration to that destination asked for;
- stranger host: a host the CA enrolled but no agent lists as a peer sends ``incoming.prepare``;
- revoked user: an operator whose certificate is revoked while connected keeps calling.

The baseline's management plane is QEMU's own: whoever holds its QMP socket is obeyed, with no
tenant, owner, policy version or revocation at all; the lab shows a caller of another tenant
pausing the guest and an already-open connection still obeyed after its access was withdrawn.
"""

from __future__ import annotations

import os
from typing import Any

from trustmig.agent.client import ControlClient, ControlError
from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.targets import (
    EVE,
    HIJACKER,
    HONEST,
    OWNER,
    RITA,
    SECADMIN,
    SOURCE,
    LabEnv,
    guest_spec,
)
from trustmig.pki.authority import Credentials
from trustmig.pki.tls import client_context
from trustmig.pki.trust import TrustBundle

NAME = "control-plane"


async def baseline(env: LabEnv) -> Outcome:
    b = env.baseline
    victim = await b.boot(NAME)
    # another tenant's admin reaches the management socket: there is no tenant to check
    await victim.cmd("stop")
    paused = await victim.status()
    await victim.cmd("cont")
    # access withdrawn (the socket made unreadable) while a session is open: still obeyed
    os.chmod(victim.qmp_path, 0)
    try:
        still = await victim.cmd("query-status")
    finally:
        os.chmod(victim.qmp_path, 0o600)
    guest = await b.state({"source": victim})
    results = {
        "cross-tenant stop": f"obeyed: the guest was {paused}",
        "ownership hijack": "obeyed: QEMU has no owner, every holder of the socket is one",
        "policy rollback": "obeyed: no policy, no version to roll back",
        "stranger host prepare": "obeyed: any host reaching an incoming port is loaded",
        "revoked user's open connection": f"obeyed: query-status answered {still.get('status')}",
    }
    return Outcome(
        compromised=paused == "paused",
        outcome="; ".join(f"{k}: {v}" for k, v in results.items()),
        evidence={"attempts": results},
        guest=guest,
    )


async def _call(c: ControlClient, op: str, params: dict[str, Any]) -> str | None:
    """The error line, or None when the agent obeyed."""
    try:
        await c.call(op, params, timeout=60)
        return None
    except ControlError as e:
        return str(e)


async def _as_host(env: LabEnv, creds: Credentials, op: str, params: dict[str, Any]) -> str | None:
    t = env.trustmig
    bundle = TrustBundle.load(creds.ca_path, creds.crl_path)
    try:
        c = await ControlClient.connect(t.cluster.hosts[HONEST].control,
                                        client_context(creds, bundle))  # fmt: skip
    except ControlError as e:
        return str(e)
    try:
        return await _call(c, op, params)
    finally:
        await c.close()


async def _tenant_and_owner(env: LabEnv, results: dict[str, str | None]) -> None:
    t = env.trustmig
    eve = await t.client(SOURCE, EVE)
    try:
        results["cross-tenant stop"] = await _call(eve, "vm.stop", {"name": NAME})
        results["cross-tenant migrate"] = await _call(
            eve, "migrate", {"vm": NAME, "to": HONEST, "options": {}}
        )
        listed = [v["name"] for v in (await eve.call("vm.list"))["vms"]]
        results["cross-tenant list"] = None if NAME in listed else "not listed"
    finally:
        await eve.close()
    oscar = await t.client(SOURCE, HIJACKER)
    try:
        forged = t.cluster.signed_policy(HIJACKER, NAME, owner=HIJACKER)
        results["ownership hijack"] = await _call(
            oscar, "policy.set", {"vm": NAME, "policy": forged}
        )
    finally:
        await oscar.close()


async def _rollback(env: LabEnv, results: dict[str, str | None]) -> None:
    t = env.trustmig
    alice = await t.client(SOURCE, OWNER)
    try:
        older = t.cluster.signed_policy(OWNER, NAME)
        newer = t.cluster.signed_policy(OWNER, NAME, countries=["FR"])  # host-b is DE
        await alice.call("policy.set", {"vm": NAME, "policy": newer})
        results["policy rollback"] = await _call(alice, "policy.set", {"vm": NAME, "policy": older})
        results["migrate under the rolled-back policy"] = await _call(
            alice, "migrate", {"vm": NAME, "to": HONEST, "options": {}}
        )
    finally:
        await alice.close()


async def _stranger(env: LabEnv, results: dict[str, str | None]) -> None:
    t = env.trustmig
    assert t.cluster.ca is not None
    stranger = t.cluster.ca.issue_host("host-s", env.workdir / NAME / "host-s")
    params = {
        "migration_id": "00000000-0000-4000-8000-00000000beef",
        "spec": {
            **guest_spec(NAME).model_dump(mode="json", exclude={"image_key"}),
            "owner": OWNER,
        },
        "options": {},
        "user": {"name": OWNER, "roles": ["owner", "operator"], "tenant": "acme"},
        "policy": t.cluster.signed_policy(OWNER, NAME),
        "audit_pub": "",
    }
    results["stranger host prepare"] = await _as_host(env, stranger, "incoming.prepare", params)


async def _revoked_user(env: LabEnv, results: dict[str, str | None]) -> None:
    t = env.trustmig
    rita = await t.client(SOURCE, RITA)
    try:
        await rita.call("ping")
        assert t.cluster.ca is not None
        t.cluster.ca.revoke(RITA, "user")
        sam = await t.client(SOURCE, SECADMIN)
        try:
            await sam.call("crl.update", {"crl": t.cluster.ca.crl_path.read_text()})
        finally:
            await sam.close()
        results["revoked user's open connection"] = await _call(rita, "vm.list", {})
    finally:
        await rita.close()


async def trustmig(env: LabEnv) -> Outcome:
    t = env.trustmig
    await t.boot(NAME)
    results: dict[str, str | None] = {}
    await _tenant_and_owner(env, results)
    await _rollback(env, results)
    await _stranger(env, results)
    await _revoked_user(env, results)
    guest = await t.state(NAME)
    audit = await t.client(SOURCE, SECADMIN)
    try:
        events = (await audit.call("audit.show", {"limit": 500}))["events"]
    finally:
        await audit.close()
    denials = [e for e in events if e.get("kind") in ("access.denied", "access.revoked")]
    obeyed = [k for k, v in results.items() if v is None]
    await t.stop_vm(NAME)
    return Outcome(
        compromised=bool(obeyed) or guest["running_copies"] != 1 or guest["where"] != SOURCE,
        outcome=("all refused: " if not obeyed else f"OBEYED {obeyed}; ")
        + "; ".join(f"{k}: {(v or 'obeyed')[:90]}" for k, v in results.items()),
        evidence={
            "attempts": results,
            "audited_denials": sorted(
                {f"{e.get('user')}:{(e.get('data') or {}).get('rule', e['kind'])}" for e in denials}
            ),
        },
        guest=guest,
    )


ATTACK = Attack(
    name=NAME,
    title="Control-plane trespass (other tenant, self-made owner, old policy, stranger host, "
    "revoked user)",
    paper="Without tenant isolation, fixed ownership, versioned policies, peer checks and "
    "revocation that takes effect, the management plane obeys whoever reaches it (§7.2, §7.4).",
    x805=(
        ("access_control", "services", "management"),
        ("access_control", "applications", "management"),
        ("authentication", "services", "management"),
        ("data_integrity", "services", "management"),
        ("non_repudiation", "services", "management"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
