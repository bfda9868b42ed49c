"""Control API: the cluster's revocation list, pushed by a security-admin and passed on by peers.

A CRL reaches every agent without copying files: a security-admin pushes it to one agent
(``trustmig crl push``), which installs it if it is the CA's and newer than the one in force,
closes the open control connections of every certificate it revokes, and pushes it on to each of
its peers (who do the same; an equal number stops the spread, an older one is refused).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from trustmig.agent.client import ControlClient, call_peer
from trustmig.agent.control import ControlServer, Operations, Request
from trustmig.agent.errors import Code, RequestError
from trustmig.pki.errors import PkiError
from trustmig.pki.trust import TrustBundle

GOSSIP_TIMEOUT_S = 10.0


class PkiApi:
    def __init__(
        self,
        host: str,
        bundle: TrustBundle,
        control: ControlServer,
        audit: Callable[..., None],
        peers: list[str],
        connect_peer: Callable[[str], Awaitable[ControlClient]],
    ) -> None:
        self.host = host
        self.bundle = bundle
        self.control = control
        self.audit = audit
        self.peers = peers
        self.connect_peer = connect_peer
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, ops: Operations) -> None:
        ops.add("crl.show", self.show, kinds=("user", "host"))
        ops.add("crl.update", self.update, kinds=("user", "host"), roles=("security-admin",))

    async def show(self, req: Request) -> dict[str, Any]:
        return {"host": self.host, "number": self.bundle.crl_number}

    async def update(self, req: Request) -> dict[str, Any]:
        pem = str(req.param("crl")).encode()
        try:
            number, installed = self.bundle.install_crl(pem)
        except PkiError as e:
            self.audit("pki.crl", user=req.peer.name, outcome="refused", data={"reason": str(e)})
            raise RequestError(str(e), Code.INVALID) from None
        closed: list[str] = []
        if installed:
            closed = self.close_revoked()
            self.audit("pki.crl", user=req.peer.name, outcome="installed",
                       data={"number": number, "from": req.peer.kind,
                             "closed_connections": closed})  # fmt: skip
            self._spread(pem, exclude=req.peer.name if req.peer.kind == "host" else None)
        return {"host": self.host, "number": number, "installed": installed, "closed": closed}

    def close_revoked(self) -> list[str]:
        """End every open control connection whose certificate the CRL now revokes."""
        closed = self.control.close_where(lambda p: self.bundle.is_revoked(p.serial))
        for name in closed:
            self.audit("access.revoked", user=name, outcome="closed",
                       data={"reason": "certificate revoked while connected"})  # fmt: skip
        return closed

    def _spread(self, pem: bytes, exclude: str | None) -> None:
        for peer in self.peers:
            if peer != exclude:
                t = asyncio.ensure_future(self._push(peer, pem))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)

    async def _push(self, peer: str, pem: bytes) -> None:
        await call_peer(self.connect_peer, peer, "crl.update", {"crl": pem.decode()},
                        GOSSIP_TIMEOUT_S)  # fmt: skip
