"""Waiting with a deadline without ever losing a cancellation.

Python 3.11's ``asyncio.wait_for`` can swallow a cancellation that arrives just as the awaited
result does (fixed in 3.12 by building it on ``asyncio.timeout``): the caller then runs on as if
never cancelled, and an agent that is stopping waits for a task that no longer stops. ``within``
is ``wait_for`` built on ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """Await ``aw``; raise TimeoutError after ``timeout`` seconds (None: no deadline)."""
    async with asyncio.timeout(timeout):
        return await aw


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None, grace: float = 5.0) -> None:
    """Cancel tasks and wait until they ended, cancelling again if one ignored it."""
    live = [t for t in tasks if t is not None and not t.done()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while live and loop.time() < deadline:
        for t in live:
            t.cancel()
        await asyncio.wait(live, timeout=0.1)
        live = [t for t in live if not t.done()]
