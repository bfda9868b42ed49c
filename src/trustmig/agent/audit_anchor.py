"""The agent's side of audit anchoring: peers witness each other's chain head.

Every ``interval`` seconds (and once at start) an agent notes its chain's length and head in its
own journal and sends them to every peer, which keeps the longest it was told (``audit.witness``)
and answers with what it held before, so a host that lost history hears of it from the first
peer it talks to. At start, before it serves users, the agent asks its peers what they witnessed
(``audit.witnessed``) and refuses to run on a trail that is shorter or different, unless an
administrator acknowledges the loss (``trustmig agent --accept-audit-loss``), which is recorded in
the new trail and in every peer's own trail.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from trustmig.agent.client import ControlClient, call_peer
from trustmig.agent.control import Operations, Request
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.journal import Journal
from trustmig.audit import AuditError, AuditLog
from trustmig.audit.anchor import AnchorVerdict, Witness, check_anchor

log = logging.getLogger("trustmig.agent")
PEER_TIMEOUT_S = 5.0
LOCAL = "local journal"


class AuditLossError(AuditError):
    """The trail is shorter or different than its witnesses saw (one line, with what to do)."""


class AuditAnchor:
    def __init__(
        self,
        host: str,
        trail: AuditLog,
        journal: Journal,
        peers: list[str],
        connect_peer: Callable[[str], Awaitable[ControlClient]],
        audit: Callable[..., None],
    ) -> None:
        self.host = host
        self.trail = trail
        self.journal = journal
        self.peers = peers
        self.connect_peer = connect_peer
        self.audit = audit
        #: The last verdict (start, a push's answer or ``audit verify``), for host status.
        self.verdict: AnchorVerdict | None = None

    def register(self, ops: Operations) -> None:
        ops.add("audit.witness", self.witness_op, kinds=("host",))
        ops.add("audit.witnessed", self.witnessed_op, kinds=("host",))

    # ------------------------------------------------------------------ what peers call
    async def witness_op(self, req: Request) -> dict[str, Any]:
        length, head = int(req.param("length", int)), str(req.param("head"))
        reset = bool(req.params.get("reset"))
        if length < 0 or len(head) != 64:
            raise RequestError("audit.witness: length >= 0 and a 64-digit head", Code.INVALID)
        held = self.journal.note_witness(req.peer.name, length, head, reset=reset)
        if reset and held is not None and held[0] > length:
            self.audit("audit.witness_reset", outcome="reset",
                       data={"host": req.peer.name, "from": held[0], "to": length})  # fmt: skip
        return {"held": None if held is None else {"length": held[0], "head": held[1]}}

    async def witnessed_op(self, req: Request) -> dict[str, Any]:
        held = self.journal.witness(req.peer.name)
        return {"held": None if held is None else {"length": held[0], "head": held[1]}}

    # ------------------------------------------------------------------ asking peers
    async def _call(self, peer: str, op: str, params: dict[str, Any]) -> dict[str, Any] | None:
        return await call_peer(self.connect_peer, peer, op, params, PEER_TIMEOUT_S)

    async def witnesses(self) -> list[Witness]:
        """What the local journal and every reachable peer saw of this host's chain."""
        out: list[Witness] = []
        own = self.journal.witness(self.host)
        if own is not None:
            out.append(Witness(LOCAL, *own))
        answers = await asyncio.gather(*(self._call(p, "audit.witnessed", {}) for p in self.peers))
        for peer, ans in zip(self.peers, answers, strict=True):
            held = (ans or {}).get("held")
            if held:
                out.append(Witness(peer, int(held["length"]), str(held["head"])))
        return out

    async def verify(self) -> AnchorVerdict:
        length, _ = self.trail.durable_head()
        self.verdict = check_anchor(self.host, length, self.trail.hash_at, await self.witnesses())
        return self.verdict

    # ------------------------------------------------------------------ start and heartbeat
    async def check_at_start(self, accept_loss: bool) -> AnchorVerdict:
        """Raise ``AuditLossError`` on lost history unless ``accept_loss``; then anchor anew."""
        verdict = await self.verify()
        if verdict.lost and not accept_loss:
            raise AuditLossError(
                f"{verdict.detail}: restore the audit database from a backup, or acknowledge "
                "the loss with 'trustmig agent --accept-audit-loss' (recorded in the trail)"
            )
        if verdict.lost:
            self.audit("audit.loss_acknowledged", outcome="acknowledged",
                       data={"verdict": verdict.code, "detail": verdict.detail,
                             "witnesses": [w.__dict__ for w in verdict.witnesses]})  # fmt: skip
            log.warning("audit trail loss acknowledged: %s", verdict.detail)
        elif verdict.code == "unanchored":
            self.audit("audit.anchor", outcome="unanchored", data={"detail": verdict.detail})
        await self.push(reset=verdict.lost)
        return verdict

    async def push(self, *, reset: bool = False) -> None:
        """Note the head locally and tell every peer; a peer that held more raises the alarm."""
        length, head = self.trail.durable_head()
        self.journal.note_witness(self.host, length, head, reset=reset)
        params = {"length": length, "head": head, "reset": reset}
        answers = await asyncio.gather(
            *(self._call(p, "audit.witness", params) for p in self.peers)
        )
        for peer, ans in zip(self.peers, answers, strict=True):
            held = (ans or {}).get("held")
            if held and not reset and int(held["length"]) > length:
                detail = (f"audit trail of {self.host} holds {length} events but {peer} "
                          f"witnessed {held['length']}")  # fmt: skip
                self.verdict = AnchorVerdict("truncated", detail, (Witness(peer, int(
                    held["length"]), str(held["head"])),))  # fmt: skip
                log.error("%s", detail)
                self.audit("audit.anchor", outcome="truncated", data={"detail": detail})

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.push()
            except Exception:  # noqa: BLE001 - anchoring must never stop the agent
                log.exception("audit anchor push failed")
