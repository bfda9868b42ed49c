"""Control API client: used by the CLI (as a user) and by agents (as a host) to call an agent.

One TLS 1.3 connection with mutual certificate authentication; requests are multiplexed by id and
long operations stream ``event`` frames to a callback before their final reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from trustmig.agent.protocol import FrameDecoder, ProtocolError, encode
from trustmig.config import parse_hostport
from trustmig.timeouts import within

log = logging.getLogger("trustmig.agent")

EventCallback = Callable[[dict[str, Any]], Awaitable[None] | None]


class ControlError(Exception):
    """The agent answered with an error, or could not be reached; one line and a ``code``.

    ``code`` is the agent's (``refused``, ``not_found``, ``aborted``...) or, when no answer
    came, ``transport`` (unreachable, connection closed) or ``timeout``."""

    def __init__(self, message: str, code: str = "transport", *, reset: bool = False) -> None:
        super().__init__(message)
        self.code = code
        #: the agent's guard dropped the connection before TLS completed (a busy listener):
        #: worth another try, unlike an agent that is not listening at all
        self.reset = reset


class ControlClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[dict[str, Any]], EventCallback | None]] = {}
        self._task = asyncio.create_task(self._read_loop())
        self.closed = asyncio.Event()
        self.close_reason: str | None = None

    @classmethod
    async def connect(
        cls,
        address: str,
        ctx: ssl.SSLContext,
        *,
        timeout: float = 10.0,
        sock: socket.socket | None = None,
    ) -> ControlClient:
        """TLS to the agent at ``address`` (over ``sock`` if given: a TCP connection already
        made to it, e.g. from inside a network namespace)."""
        host, port = parse_hostport(address)
        try:
            if sock is not None:
                opening = asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="")
            else:
                opening = asyncio.open_connection(host, port, ssl=ctx, server_hostname=None)
            reader, writer = await within(opening, timeout)
        except (OSError, TimeoutError, ssl.SSLError) as e:
            reset = isinstance(e, ConnectionResetError | ssl.SSLEOFError)
            raise ControlError(f"cannot reach agent at {address}: {e}", "transport",
                               reset=reset) from None  # fmt: skip
        return cls(reader, writer)

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        obj = self._writer.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None

    async def _read_loop(self) -> None:
        dec = FrameDecoder()
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    self.close_reason = "connection closed by the agent"
                    break
                for msg in dec.feed(data):
                    await self._dispatch(msg)
        except (OSError, ProtocolError, ssl.SSLError) as e:
            self.close_reason = f"control connection failed: {e}"
        except asyncio.CancelledError:
            self.close_reason = "closed"
        finally:
            self.closed.set()
            for fut, _ in self._pending.values():
                if not fut.done():
                    reason = self.close_reason or "connection closed"
                    fut.set_exception(ControlError(reason, "transport"))
            self._pending.clear()

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        entry = self._pending.get(msg.get("id", -1))
        if entry is None:
            return
        fut, cb = entry
        if "event" in msg:
            if cb is not None:
                r = cb(msg)
                if asyncio.iscoroutine(r):
                    await r
            return
        self._pending.pop(msg["id"], None)
        if not fut.done():
            fut.set_result(msg)

    async def call(
        self,
        op: str,
        params: dict[str, Any] | None = None,
        *,
        on_event: EventCallback | None = None,
        timeout: float | None = 60.0,
    ) -> dict[str, Any]:
        if self.closed.is_set():
            raise ControlError(self.close_reason or "control connection is closed", "transport")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (fut, on_event)
        try:
            self._writer.write(encode({"op": op, "id": rid, "params": params or {}}))
            await self._writer.drain()
        except (ConnectionError, OSError) as e:
            self._pending.pop(rid, None)
            raise ControlError(
                f"{op}: the agent closed the connection ({self.close_reason or e})", "transport"
            ) from None
        try:
            msg = await within(fut, timeout)
        except TimeoutError:
            self._pending.pop(rid, None)
            raise ControlError(f"{op}: no answer within {timeout:.0f}s", "timeout") from None
        if not msg.get("ok"):
            code = msg.get("code")
            raise ControlError(
                str(msg.get("error") or f"{op} failed"),
                code if isinstance(code, str) and code else "failed",
            )
        result = msg.get("result") or {}
        return result if isinstance(result, dict) else {"value": result}

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await within(self._writer.wait_closed(), 2)


async def call_peer(
    connect: Callable[[str], Awaitable[ControlClient]],
    peer: str,
    op: str,
    params: dict[str, Any],
    timeout: float,
) -> dict[str, Any] | None:
    """One best-effort call to a peer (gossip, witnesses): its result, or None when the peer is
    down or answers with an error (logged; the caller carries on with the others)."""
    try:
        client = await within(connect(peer), timeout)
    except Exception as e:  # noqa: BLE001 - a peer that is down is skipped
        log.info("%s not sent to %s: %s", op, peer, e)
        return None
    try:
        return await client.call(op, params, timeout=timeout)
    except Exception as e:  # noqa: BLE001
        log.info("%s on %s failed: %s", op, peer, e)
        return None
    finally:
        with contextlib.suppress(Exception):
            await client.close()
