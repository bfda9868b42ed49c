"""Messages between an agent and its relay processes: one JSON object per SOCK_SEQPACKET packet.

Sequenced packets keep message boundaries, so a file descriptor passed with ``SCM_RIGHTS``
arrives with exactly the message that names it. The socket lives in a private (0700) directory
and is itself 0600: stream keys cross it, so nothing but the host's root may connect.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

MAX_MESSAGE = 64 * 1024
MAX_FDS = 4


class RelayWireError(Exception):
    """A malformed message, or the other end went away."""


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise RelayWireError(f"relay message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    try:
        if fds:
            socket.send_fds(sock, [body], fds)
        else:
            sock.sendall(body)
    except OSError as e:
        raise RelayWireError(f"relay socket: {e}") from None


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message and the descriptors that came with it; RelayWireError on EOF or garbage."""
    try:
        body, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    except OSError as e:
        raise RelayWireError(f"relay socket: {e}") from None
    if not body:
        for fd in fds:
            _close(fd)
        raise RelayWireError("relay socket closed")
    try:
        msg = json.loads(body)
        if not isinstance(msg, dict):
            raise ValueError("not an object")
    except ValueError as e:
        for fd in fds:
            _close(fd)
        raise RelayWireError(f"malformed relay message: {e}") from None
    return msg, list(fds)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
