"""Sockets and commands inside a network namespace.

A socket belongs to the namespace it was created in, whatever thread uses it later. So a helper
thread enters the namespace (``setns`` changes only the calling thread), creates and connects
the socket and ends; the caller then uses the connected socket from anywhere (asyncio included).
Nothing is ever sent from the root namespace to a namespace's address.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")


class NetnsError(Exception):
    """A namespace is missing or could not be entered (the message names it)."""


def enter(netns: str) -> None:
    """Move the calling thread into ``netns`` (only this thread); raises NetnsError."""
    _setns(NETNS_DIR / netns)


def _setns(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {path.name} does not exist") from None
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"cannot enter network namespace {path.name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def connect_in(netns: str, host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to ``host:port`` made from inside ``netns``; raises OSError/NetnsError."""
    out: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            _setns(NETNS_DIR / netns)
            out.append(socket.create_connection((host, port), timeout=timeout))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out.append(e)

    t = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join(timeout + 5)
    if not out:
        raise TimeoutError(f"connecting to {host}:{port} in {netns} took over {timeout:.0f}s")
    res = out[0]
    if isinstance(res, BaseException):
        raise res
    res.settimeout(None)
    return res


def exec_argv(netns: str, argv: list[str]) -> list[str]:
    """``argv`` run inside ``netns`` (``ip netns exec`` execs it: the PID stays the command's)."""
    return ["ip", "netns", "exec", netns, *argv]
