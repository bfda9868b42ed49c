"""The agent's metrics: what feeds :class:`~trustmig.metrics.AgentMetrics` and ``/metrics``.

``/metrics`` has a listener of its own (``[metrics] listen``), so a scraper never touches the
control port. With ``tls`` (default) it uses the control port's TLS settings: TLS 1.3, a client
certificate of the cluster's CA required, and the certificate checked against the CRL on every
request (a revoked scraper gets 403). Metrics name no VM and no tenant, so any cluster
certificate may scrape.

The guest's felt pause is measured by the destination, which sees both sides of the switch:
the source sends its last heartbeats with the receipt, and the destination waits for its own
guest's first heartbeats, then observes the largest gap between consecutive ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from trustmig.config import parse_hostport
from trustmig.hypervisor.heartbeat import analyse
from trustmig.metrics import AgentMetrics, StateSample

log = logging.getLogger(__name__)
#: how long the destination waits for its guest's heartbeats to measure the felt pause
PAUSE_WAIT_S = 5.0
CHANNELS = frozenset({"secure", "qemu-tls"})


class Observability:
    """Metrics for one agent; ``agent`` is the :class:`~trustmig.agent.server.Agent`."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.metrics = AgentMetrics(agent.cfg.name, self.sample)
        self.audit_verified: tuple[float, bool] | None = None
        self.address: str | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ the scrape
    def sample(self) -> StateSample:
        a = self.agent
        adm = a.admission.snapshot()
        states = Tally(vm.state for vm in a.vms.vms.values())
        moving = {
            "source": sum(1 for d in a.registry.outgoing.values() if not d.core.terminal),
            "destination": sum(1 for d in a.registry.incoming.values() if not d.core.terminal),
        }
        verified = self.audit_verified
        return StateSample(
            guard_rules=a.guard.counters(),
            admission_running={d: len(v) for d, v in adm["running"].items()},
            admission_queued={d: len(v) for d, v in adm["queued"].items()},
            quarantined_hosts=len(a.quarantine.snapshot()),
            audit_events=a.gov.audit.length,
            audit_last_verified=verified[0] if verified else None,
            audit_last_ok=verified[1] if verified else None,
            vms_by_state=dict(states),
            migrations_in_progress=moving,
        )

    def note_audit_verified(self, ok: bool) -> None:
        self.audit_verified = (time.time(), ok)

    # ------------------------------------------------------------------ the felt pause
    def measure_pause(self, vm: str, source_hbs: Sequence[Sequence[float]], channel: str,
                      mode: str) -> None:  # fmt: skip
        """Observe the guest's felt pause once its heartbeats resumed here (in the background;
        a guest without heartbeats is simply not measured)."""
        try:
            src = [(int(s), float(t)) for s, t in source_hbs][-8:]
        except (TypeError, ValueError, OverflowError):
            return
        channel = channel if channel in CHANNELS else "other"
        mode = mode if mode in ("precopy", "postcopy") else "other"
        if not src or not all(math.isfinite(t) for _, t in src):
            return
        task = asyncio.ensure_future(self._pause(vm, src, channel, mode))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pause(self, vm: str, src: list[tuple[int, float]], channel: str,
                     mode: str) -> None:  # fmt: skip
        deadline = time.monotonic() + PAUSE_WAIT_S
        while time.monotonic() < deadline:
            m = self.agent.vms.vms.get(vm)
            if m is None:
                return
            dst = [(h.seq, h.host_ts) for h in m.qemu.console.heartbeats_since(src[-1][1] - 0.001)]
            if len(dst) >= 2:
                cont = analyse(src, dst)
                if cont.gap_ms is not None:
                    self.metrics.guest_pause(channel, mode, cont.gap_ms / 1000)
                return
            await asyncio.sleep(0.25)

    # ------------------------------------------------------------------ the listener
    async def start(self) -> None:
        """Serve ``/metrics`` if ``[metrics] listen`` is set; raises OSError if it cannot bind."""
        cfg = self.agent.cfg.metrics
        if not cfg.listen:
            return
        app = web.Application(middlewares=[self._authenticate] if cfg.tls else [])
        app.router.add_get("/metrics", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, port = parse_hostport(cfg.listen)
        site = web.TCPSite(self._runner, host, port,
                           ssl_context=self.agent.server_ctx if cfg.tls else None)  # fmt: skip
        await site.start()
        server: Any = site._server  # noqa: SLF001 - the bound address of an ephemeral port
        sock = server.sockets[0].getsockname() if server is not None else (host, port)
        self.address = f"{sock[0]}:{sock[1]}"
        log.info("metrics on %s://%s/metrics", "https" if cfg.tls else "http", self.address)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Callable[..., Any]) -> Any:
        ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        try:
            der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
            if not der:
                raise ValueError("no client certificate")
            self.agent.bundle.refresh()
            self.agent.bundle.verify(der)
        except Exception as e:  # noqa: BLE001 - any failure is a refusal
            first = (str(e).splitlines() or [type(e).__name__])[0]
            return web.Response(status=403, text=f"forbidden: {first}\n")
        return await handler(request)

    async def _serve(self, request: web.Request) -> web.Response:
        # on the loop: the scrape reads the agent's tables, which only the loop changes
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
            self._runner = None
