"""The control server: TLS with mutual certificates, framing, and dispatch to the API modules.

Every request is authorised against the caller's *verified* certificate identity before its
handler runs: host certificates may only use the agent-to-agent operations, user certificates
only the user ones, and role gates apply to users. Handlers live in the ``api_*`` modules, one
per area; each registers its operations in an :class:`Operations` table. Errors are answered as
``{"ok": false, "error": "<one line>", "code": "<code>"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from trustmig.agent.client import ControlError
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.protocol import FrameDecoder, ProtocolError, encode
from trustmig.guard.ratelog import RateLimitedLog
from trustmig.pki.errors import PkiError
from trustmig.pki.identity import PeerIdentity
from trustmig.policy import PolicyError

log = logging.getLogger("trustmig.agent")
rlog = RateLimitedLog(log)


class Connection:
    """One authenticated control connection; ``closed`` is set when it ends."""

    def __init__(self, writer: asyncio.StreamWriter, peer: PeerIdentity) -> None:
        self.writer = writer
        self.peer = peer
        self.closed = asyncio.Event()
        self._lock = asyncio.Lock()

    def close(self) -> None:
        """End the connection now (its reader sees EOF and stops)."""
        self.closed.set()
        self.writer.close()

    def peer_cert_der(self) -> bytes | None:
        sslobj = self.writer.get_extra_info("ssl_object")
        return sslobj.getpeercert(binary_form=True) if sslobj is not None else None

    async def send(self, msg: dict[str, Any]) -> None:
        if self.closed.is_set():
            return
        async with self._lock:
            try:
                self.writer.write(encode(msg))
                await self.writer.drain()
            except (ConnectionError, OSError):
                self.closed.set()


class Request:
    """One call: its operation, parameters, caller and a way to stream events back."""

    def __init__(self, conn: Connection, rid: int, op: str, params: dict[str, Any]) -> None:
        self.conn = conn
        self.id = rid
        self.op = op
        self.params = params

    @property
    def peer(self) -> PeerIdentity:
        return self.conn.peer

    async def emit(self, event: dict[str, Any]) -> None:
        await self.conn.send({"id": self.id, **event})

    def param(self, key: str, kind: type = str) -> Any:
        if key not in self.params:
            raise RequestError(f"{self.op}: missing parameter {key!r}", Code.INVALID)
        val = self.params[key]
        if kind is not Any and not isinstance(val, kind):
            raise RequestError(
                f"{self.op}: parameter {key!r} must be {kind.__name__}", Code.INVALID
            )
        return val


Handler = Callable[[Request], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Operation:
    handler: Handler
    #: Certificate kinds that may call it: ``user``, ``host`` or both.
    kinds: frozenset[str]
    #: Roles a user needs (any one of them); empty: any authenticated user of the right kind.
    roles: tuple[str, ...] = ()


@dataclass
class Operations:
    """The operation table the API modules fill in."""

    ops: dict[str, Operation] = field(default_factory=dict)

    def add(
        self, name: str, handler: Handler, *, kinds: tuple[str, ...] = ("user",),
        roles: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        if name in self.ops:
            raise ValueError(f"operation {name} registered twice")
        self.ops[name] = Operation(handler, frozenset(kinds), roles)


class ControlServer:
    """Serves one agent's control API on connections the guard already screened."""

    def __init__(
        self,
        operations: Operations,
        authenticate: Callable[[Any], PeerIdentity],
        audit: Callable[..., None],
        guard_authenticated: Callable[[int, str], None],
        is_peer: Callable[[str], bool] = lambda name: True,
        is_revoked: Callable[[PeerIdentity], bool] = lambda peer: False,
    ) -> None:
        self.is_revoked = is_revoked
        #: While the agent starts, only these operations are served (peers checking each
        #: other's audit anchors at the same time must not wait for each other).
        self.starting_ops: frozenset[str] | None = None
        self.operations = operations
        self.authenticate = authenticate
        self.audit = audit
        self.guard_authenticated = guard_authenticated
        self.is_peer = is_peer
        self.connections: set[Connection] = set()

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_id: int = -1
    ) -> None:
        sslobj = writer.get_extra_info("ssl_object")
        try:
            peer = self.authenticate(sslobj)
        except PkiError as e:
            rlog.log(logging.WARNING, "control-refused", "control connection refused: %s", e)
            self.audit("control.refused", data={"reason": str(e)})
            writer.close()
            return
        if conn_id >= 0:
            self.guard_authenticated(conn_id, peer.name)
        conn = Connection(writer, peer)
        self.connections.add(conn)
        dec = FrameDecoder()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for msg in dec.feed(data):
                    t = asyncio.create_task(self._dispatch(conn, msg))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
        except ProtocolError as e:
            # one line says what was wrong before the connection is closed, and the trail keeps
            # who sent it (the connection is authenticated, so this is attributable)
            await conn.send({"id": None, "ok": False, "error": str(e), "code": Code.INVALID})
            self.audit("access.malformed", user=peer.name, outcome="closed",
                       data={"reason": str(e), "kind": peer.kind})  # fmt: skip
            log.info("control connection from %s closed: %s", peer.name, e)
        except (ConnectionError, OSError) as e:
            log.info("control connection from %s closed: %s", peer.name, e)
        finally:
            self.connections.discard(conn)
            conn.close()

    def close_where(self, predicate: Callable[[PeerIdentity], bool]) -> list[str]:
        """Close the open connections whose peer matches (a revoked certificate); their names."""
        names = []
        for conn in list(self.connections):
            if predicate(conn.peer):
                names.append(conn.peer.name)
                conn.close()
        return names

    def _authorise(self, conn: Connection, op: str) -> Operation:
        entry = self.operations.ops.get(op)
        if entry is None:
            raise RequestError(f"unknown operation {op!r}", Code.INVALID)
        if self.starting_ops is not None and op not in self.starting_ops:
            raise RequestError(
                f"{op}: the agent is starting (checking its audit trail with its peers); retry",
                Code.BUSY,
            )
        if conn.peer.kind not in entry.kinds:
            raise RequestError(f"{op} is not allowed for a {conn.peer.kind} certificate",
                               Code.DENIED)  # fmt: skip
        if self.is_revoked(conn.peer):
            self.audit("access.revoked", user=conn.peer.name, outcome="closed",
                       data={"op": op, "reason": "revoked while connected"})  # fmt: skip
            conn.close()
            raise RequestError(f"{op} denied: the certificate of {conn.peer.name} is revoked",
                               Code.DENIED)  # fmt: skip
        if conn.peer.kind == "host" and not self.is_peer(conn.peer.name):
            # a host the CA enrolled but this host was never told to trust gets nothing
            self.audit("access.denied", outcome="denied",
                       data={"op": op, "rule": "peers", "host": conn.peer.name})  # fmt: skip
            raise RequestError(
                f"{op} denied: host {conn.peer.name} is not a peer of this host "
                "(add it under [peers] in the host config)",
                Code.DENIED,
            )
        if entry.roles and conn.peer.kind == "user" and not set(entry.roles) & set(conn.peer.roles):
            self.audit("access.denied", user=conn.peer.name, outcome="denied",
                       data={"op": op, "roles": list(conn.peer.roles)})  # fmt: skip
            raise RequestError(
                f"{op} denied: {conn.peer.name} has roles [{', '.join(conn.peer.roles)}], "
                f"needs one of [{', '.join(entry.roles)}]",
                Code.DENIED,
            )
        return entry

    async def _dispatch(self, conn: Connection, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        op = str(msg.get("op", ""))
        params = msg.get("params") or {}
        try:
            if not isinstance(rid, int) or not isinstance(params, dict):
                raise RequestError(
                    "malformed request: 'id' must be an integer, 'params' an object", Code.INVALID
                )
            entry = self._authorise(conn, op)
            result = await entry.handler(Request(conn, rid, op, params))
            await conn.send({"id": rid, "ok": True, "result": result})
        except RequestError as e:
            await conn.send({"id": rid, "ok": False, "error": _line(e), "code": e.code})
        except ControlError as e:
            await conn.send({"id": rid, "ok": False, "error": _line(e), "code": e.code})
        except ValidationError as e:
            await conn.send({"id": rid, "ok": False, "error": validation_line(op, e),
                             "code": Code.INVALID})  # fmt: skip
        except (ValueError, PkiError, PolicyError) as e:
            await conn.send({"id": rid, "ok": False, "error": _line(e), "code": Code.INVALID})
        except Exception as e:  # noqa: BLE001 - report, never crash the agent
            log.exception("%s failed", op)
            await conn.send({"id": rid, "ok": False, "code": Code.INTERNAL,
                             "error": f"{op} failed: {type(e).__name__}: {e}"})  # fmt: skip


def validation_line(op: str, e: ValidationError) -> str:
    """One line naming the first invalid field, what it must be and what was sent."""
    errs = e.errors(include_url=False)
    if not errs:
        return f"{op}: invalid parameters"
    first = errs[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "(request)"
    got = repr(first.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{op}: field {loc}: {first.get('msg', 'invalid')}, got {got}{more}"


def _line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


async def close_quietly(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
