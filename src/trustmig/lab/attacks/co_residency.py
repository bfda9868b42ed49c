"""Co-residency: an attacker migrates its VM onto the victim's host to build a covert channel
(the paper's §7.11, "place it on same host server as the target VM").

The victim runs on ``host-b``; its owner's signed policy says it shares a host only with VMs of
its own tenant. The attacker, an owner in another tenant, asks to move its own VM there. The
baseline places a VM wherever whoever asks says: the attacker's VM lands next to the victim.
trustmig's ``host-b`` decides from what really runs there: a resident forbids the newcomer, the
migration is refused before any memory is sent, and the attacker's VM stays where it was. The
refusal does not name the victim to the attacker.
"""

from __future__ import annotations

from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.targets import EVE, HONEST, LabEnv

NAME = "co-residency"
VICTIM_HOST = HONEST


async def baseline(env: LabEnv) -> Outcome:
    # placement by whoever asks: the attacker names the victim's host and the VM goes there
    prog, guest = await env.baseline.migrate_to(f"{NAME}-attacker", VICTIM_HOST)
    landed = guest["where"] == VICTIM_HOST
    return Outcome(
        compromised=landed,
        outcome=f"the attacker's VM now runs on {guest['where']}, next to the victim (nothing "
        "asks whom a VM lands next to)",
        evidence={
            "victim_host": VICTIM_HOST,
            "attacker_vm_on": guest["where"],
            "migration": prog.status,
        },
        guest=guest,
    )


async def trustmig(env: LabEnv) -> Outcome:
    t = env.trustmig
    victim, attacker = f"{NAME}-victim", f"{NAME}-attacker"
    await t.boot(victim, host=VICTIM_HOST, neighbours="tenant")
    await t.boot(attacker, user=EVE, tenant="evil")
    res, err = await t.migrate(attacker, VICTIM_HOST, user=EVE)
    guest = await t.state(attacker, EVE)
    victim_state = await t.state(victim)
    await t.stop_vm(victim)
    await t.stop_vm(attacker, EVE)
    landed = res is not None or VICTIM_HOST in guest["where"].split(",")
    return Outcome(
        compromised=landed,
        outcome=f"refused: {err}" if res is None else "the attacker's VM moved next to the victim",
        evidence={
            "victim_host": VICTIM_HOST,
            "attacker_vm_on": guest["where"],
            "error": err,
            "victim_named": bool(err and victim in err),
            "victim_still_on": victim_state["where"],
        },
        guest=guest,
    )


ATTACK = Attack(
    name=NAME,
    title="Co-residency by migration",
    paper="A malicious user migrates a malicious VM onto the same host as the target VM and then "
    "builds a covert channel that leaks the target's information.",
    x805=(
        ("access_control", "services", "control"),
        ("privacy", "infrastructure", "end_user"),
        ("data_confidentiality", "infrastructure", "end_user"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
