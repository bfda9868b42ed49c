"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``):
a page stays open while the test reads its live DOM, as an operator's browser would.

Messages are JSON objects ended by a NUL byte; Chromium reads commands on fd 3 and writes
answers and events on fd 4. Only the standard library is needed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


class Browser:
    """One Chromium with one page; every call raises AssertionError with Chromium's error."""

    def __init__(self, profile: Path, width: int = 1366, height: int = 900) -> None:
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        assert exe, "chromium is not installed: run `make test` or scripts/bootstrap"
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire() -> None:  # in the child: its fds 3 and 4 are the two pipe ends
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "--hide-scrollbars",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=wire,
            pass_fds=(3, 4),
        )  # fmt: skip
        os.close(to_child_r)
        os.close(from_child_w)
        self._ids = 0
        self._answers: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.command("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.command("Target.attachToTarget",
                                    {"targetId": target, "flatten": True})["sessionId"]  # fmt: skip
        self.command("Page.enable", session=True)

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._answers[msg["id"]] = msg
                        self._cond.notify_all()

    def command(self, method: str, params: dict[str, Any] | None = None, *,
                session: bool = False, timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
        self._ids += 1
        rid = self._ids
        msg: dict[str, Any] = {"id": rid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while rid not in self._answers:
                left = deadline - time.monotonic()
                assert left > 0, f"chromium did not answer {method} in {timeout:.0f} s"
                self._cond.wait(left)
            answer = self._answers.pop(rid)
        assert "error" not in answer, f"{method}: {answer['error']}"
        return dict(answer.get("result") or {})

    def open(self, url: str) -> None:
        self.command("Page.navigate", {"url": url}, session=True)
        self.until("document.readyState === 'complete'", timeout=30)

    def evaluate(self, expression: str) -> Any:
        res = self.command("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           session=True)  # fmt: skip
        assert "exceptionDetails" not in res, f"{expression}: {res['exceptionDetails']}"
        return res["result"].get("value")

    def until(self, expression: str, timeout: float = 60.0, every: float = 0.2) -> Any:
        """The first truthy value of ``expression`` in the page, polled (a DOM node comes back
        as an empty object: test for it with ``!!``)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"page never showed: {expression}"
            time.sleep(every)

    def screenshot(self, path: Path) -> Path:
        data = self.command("Page.captureScreenshot", {"format": "png", "captureBeyondViewport":
                                                       True}, session=True)["data"]  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(AssertionError):
            self.command("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                os.close(fd)
