"""``trustmig dashboard``: a live web view of the cluster, served on loopback as the operator.

Server-side rendered (Jinja2, autoescaped) with a few lines of script that swap in the refreshed
state; no build step and nothing fetched from the internet. The page is read-only unless the
dashboard runs with ``--allow-actions``; then each action is one control call made with the
operator's credentials (roles, tenants and the audit trail as with the CLI), guarded by a
per-process CSRF token and a same-origin check.

It binds loopback only: it acts with the operator's certificate, so reaching it is reaching
the cluster as that operator (use SSH port forwarding from a laptop, as with ``kubectl proxy``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from trustmig.dashboard.collect import ClusterReader
from trustmig.dashboard.view import cluster_view

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
MAX_ACTIONS = 20


class DashboardError(Exception):
    """A dashboard set-up the operator must change (one line, says what to do)."""


@dataclass
class Action:
    kind: str
    target: str
    status: str = "running"
    detail: str = ""
    at: float = 0.0


def require_loopback(host: str) -> None:
    """Raises DashboardError unless ``host`` is a loopback address."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise DashboardError(f"--listen {host}: the dashboard acts with your credentials, so it "
                             "binds loopback only; reach it through an SSH tunnel")  # fmt: skip


def load_lab(path: Path | None) -> dict[str, Any] | None:
    """The lab's last report (``trustmig lab run --output FILE``), summarised; None if unset.
    A report that cannot be read is shown as such, never fatal."""
    if path is None:
        return None
    from trustmig.lab.report import summarise, target_state

    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"summary": {"attacks": 0, "baseline_compromised": 0, "trustmig_compromised": 0,
                            "errors": 1}, "attacks": [], "error": str(e)}  # fmt: skip
    attacks = [a for a in report.get("attacks") or [] if isinstance(a, dict)]
    return {"summary": summarise(report), "attacks": [
        {"name": a.get("name"), "baseline": target_state(a, "baseline"),
         "trustmig": target_state(a, "trustmig")} for a in attacks]}  # fmt: skip


class Dashboard:
    """The web app around a :class:`ClusterReader` refreshed every ``interval_s``."""

    def __init__(self, reader: ClusterReader, *, user: str, interval_s: float = 1.0,
                 allow_actions: bool = False, lab_report: Path | None = None) -> None:  # fmt: skip
        self.reader = reader
        self.user = user
        self.interval_s = interval_s
        self.allow_actions = allow_actions
        self.lab_report = lab_report
        self.csrf = secrets.token_urlsafe(32)
        self.actions: list[Action] = []
        self.updated = 0.0
        #: the Host values this dashboard answers to (set once it listens): a page of another
        #: name that rebinds to 127.0.0.1 gets nothing (DNS rebinding)
        self.origins: frozenset[str] = frozenset()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined,
        )  # fmt: skip

    # ------------------------------------------------------------------ state
    def view(self) -> dict[str, Any]:
        return cluster_view(self.reader.hosts, load_lab(self.lab_report))

    async def poll(self) -> None:
        while True:
            await self.reader.round()
            self.updated = time.time()
            await asyncio.sleep(self.interval_s)

    def _context(self) -> dict[str, Any]:
        return {"view": self.view(), "user": self.user, "actions": self.allow_actions,
                "csrf": self.csrf, "refresh_s": max(1, round(self.interval_s)),
                "title": "cluster", "recent_actions": list(reversed(self.actions)),
                "updated": time.strftime("%H:%M:%S", time.localtime(self.updated))}  # fmt: skip

    # ------------------------------------------------------------------ pages
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._headers])
        app.router.add_get("/", self.page)
        app.router.add_get("/fragment", self.fragment)
        app.router.add_get("/api/state", self.state)
        app.router.add_static("/static", HERE / "static", show_index=False)
        app.router.add_post("/actions/{kind}", self.action)
        return app

    @web.middleware
    async def _headers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.origins and request.host not in self.origins:
            return web.Response(status=421, text="this dashboard answers only to its own "
                                "loopback address\n")  # fmt: skip
        resp: web.StreamResponse = await handler(request)
        resp.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        )
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    async def page(self, request: web.Request) -> web.Response:
        html = self.env.get_template("page.html").render(**self._context())
        return web.Response(text=html, content_type="text/html")

    async def fragment(self, request: web.Request) -> web.Response:
        html = self.env.get_template("live.html").render(**self._context())
        return web.Response(text=html, content_type="text/html")

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(self.view(), dumps=lambda o: json.dumps(o, default=str))

    # ------------------------------------------------------------------ actions
    async def action(self, request: web.Request) -> web.Response:
        if not self.allow_actions:
            return web.Response(status=403, text="read-only: start with --allow-actions\n")
        form = await request.post()
        token = str(form.get("csrf") or "")
        origin = request.headers.get("Origin")
        same = origin is None or origin in {f"http://{o}" for o in self.origins}
        if not same or not hmac.compare_digest(token, self.csrf):
            return web.Response(status=403, text="forbidden: stale page or another origin\n")
        kind = request.match_info["kind"]
        try:
            act = self._start(kind, {k: str(v) for k, v in form.items()})
        except (KeyError, ValueError) as e:
            return web.Response(status=400, text=f"bad request: {e}\n")
        self.actions = [*self.actions, act][-MAX_ACTIONS:]
        raise web.HTTPSeeOther("/")

    def _start(self, kind: str, form: dict[str, str]) -> Action:
        if kind == "migrate":
            host, _, vm = form["vm"].partition("/")
            dest = form["destination"]
            act = Action("migrate", f"{vm} {host} -> {dest}", at=time.time())
            call = self.reader.call(host, "migrate", {"vm": vm, "to": dest, "options": {}})
        elif kind == "evacuate":
            act = Action("evacuate", form["host"], at=time.time())
            call = self.reader.call(form["host"], "host.evacuate", {})
        elif kind == "clear":
            act = Action("clear quarantine", form["host"], at=time.time())
            call = self._clear_everywhere(form["host"])
        else:
            raise ValueError(f"no action {kind!r}: migrate, evacuate or clear")
        task = asyncio.ensure_future(self._carry_out(act, call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return act

    async def _clear_everywhere(self, host: str) -> dict[str, Any]:
        cleared = []
        for raw in list(self.reader.hosts.values()):
            q = (raw.answers.get("quarantine") or {}).get("quarantined") or {}
            if host in q:
                await self.reader.call(raw.name, "guard.clear", {"host": host})
                cleared.append(raw.name)
        return {"cleared_on": cleared}

    async def _carry_out(self, act: Action, call: Any) -> None:
        try:
            await call
            act.status = "completed"
        except Exception as e:  # noqa: BLE001 - the agent's one-line refusal is the outcome
            act.status, act.detail = "failed", (str(e).splitlines() or [type(e).__name__])[0]

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await self.reader.close()


async def serve(dash: Dashboard, host: str, port: int, on_ready: Any = None) -> None:
    """Run the dashboard until cancelled; ``on_ready(url)`` once it listens."""
    require_loopback(host)
    runner = web.AppRunner(dash.app(), access_log=None)
    await runner.setup()
    poller = asyncio.ensure_future(dash.poll())
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        server: Any = site._server  # noqa: SLF001 - the bound port when 0 was asked
        bound = server.sockets[0].getsockname()[1] if server is not None else port
        names = {f"[{host}]"} if ":" in host else {host}
        if host in ("127.0.0.1", "localhost"):
            names |= {"127.0.0.1", "localhost"}
        dash.origins = frozenset(f"{n}:{bound}" for n in names)
        if on_ready is not None:
            on_ready(f"http://{host}:{bound}/")
        await asyncio.Event().wait()
    finally:
        poller.cancel()
        with contextlib.suppress(BaseException):
            await poller
        await dash.close()
        await runner.cleanup()
