"""False resource advertisement: a host lies about its free capacity to attract VMs.

Two destinations advertise free memory and vCPUs; one (``host-l``) claims eight times what it
has. The baseline's placement reads unsigned advertisements and picks the host with the most
free memory, as simple schedulers do, then migrates there. trustmig checks the destination's
signed claim against the capacity measured into its TPM at launch: the liar is refused before
any memory is sent and quarantined until a security administrator clears it.
"""

from __future__ import annotations

import time
from typing import Any

from trustmig.agent.capacity import host_capacity
from trustmig.config import HostConfig
from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.liar_agent import LIE_FACTOR
from trustmig.lab.targets import HONEST, LIAR, SOURCE, LabEnv

NAME = "false-resources"


def _advert(host: str, factor: int) -> dict[str, Any]:
    cap = host_capacity(HostConfig(name=host))
    return {
        "host": host,
        "free_mem_mib": cap.mem_mib * factor,
        "free_vcpus": cap.vcpus * factor,
        "ts": time.time(),
    }


async def baseline(env: LabEnv) -> Outcome:
    b = env.baseline
    adverts = [_advert(HONEST, 1), _advert(LIAR, LIE_FACTOR)]
    chosen = max(adverts, key=lambda a: a["free_mem_mib"])["host"]
    prog, guest = await b.migrate_to(NAME, chosen)
    return Outcome(
        compromised=chosen == LIAR and guest["where"] == LIAR,
        outcome=f"placement believed the unsigned adverts and sent the VM to {chosen} "
        f"(claimed {adverts[1]['free_mem_mib']} MiB free, {LIE_FACTOR}x its real memory)",
        evidence={"adverts": adverts, "chosen": chosen, "migration": prog.status},
        guest=guest,
    )


async def trustmig(env: LabEnv) -> Outcome:
    t = env.trustmig
    await t.boot(NAME)
    res, err = await t.migrate(NAME, LIAR)
    c = await t.client(SOURCE)
    try:
        quarantine = (await c.call("guard.quarantine"))["quarantined"]
        again_err = None
        try:
            await c.call("migrate", {"vm": NAME, "to": LIAR, "options": {}}, timeout=60)
        except Exception as e:  # noqa: BLE001 - the refusal is the evidence
            again_err = str(e)
    finally:
        await c.close()
    guest = await t.state(NAME)
    cleared = await t.clear_quarantine(LIAR)
    return Outcome(
        compromised=res is not None or guest["where"] != SOURCE,
        outcome=f"refused: {err}" if res is None else "the lying host received the VM",
        evidence={
            "error": err,
            "quarantined": quarantine.get(LIAR),
            "second_attempt": again_err,
            "cleared_by": cleared,
        },
        guest=guest,
    )


ATTACK = Attack(
    name=NAME,
    title="False resource advertisement",
    paper="A malicious host advertises false free resources to attract VMs (and then steal or "
    "starve them), abusing resource-based placement.",
    x805=(
        ("availability", "services", "control"),
        ("data_integrity", "services", "control"),
        ("non_repudiation", "services", "control"),
        ("authentication", "services", "control"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
