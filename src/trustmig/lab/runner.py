"""`trustmig lab run`: every attack against the baseline and trustmig, one JSON report.

Attacks run one after another (never two VMs' worth of work in parallel on a small host); each
target run has a time budget, and whatever an attack left behind (QEMUs, VMs on the cluster) is
stopped before the next one starts. An attack that fails to run is reported with its error
rather than stopping the lab.
"""

from __future__ import annotations

import asyncio
import platform
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trustmig.lab.attack import Attack, timed
from trustmig.lab.attacks import ATTACKS, BY_NAME
from trustmig.lab.targets import LabEnv

#: Time budget of one attack against one target.
TARGET_BUDGET_S = 300.0

Say = Callable[[str], None]
OnResult = Callable[[dict[str, Any]], None]


def select(names: list[str] | None) -> list[Attack]:
    """The attacks to run, in the lab's order; unknown names are a one-line error."""
    if not names:
        return list(ATTACKS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}: choose from {', '.join(BY_NAME)}")
    return [a for a in ATTACKS if a.name in names]


def _qemu_version() -> str:
    try:
        out = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        return out.splitlines()[0].removeprefix("QEMU emulator version ").strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


async def _one(env: LabEnv, attack: Attack, target: str) -> dict[str, Any]:
    run = attack.baseline if target == "baseline" else attack.trustmig
    try:
        out = await asyncio.wait_for(timed(run, env), TARGET_BUDGET_S)
        return out.to_dict()
    except Exception as e:  # noqa: BLE001 - a broken attack is reported, the lab goes on
        line = (str(e).splitlines() or [type(e).__name__])[0]
        tb = traceback.format_exception(e)[-3:]
        return {
            "compromised": None,
            "outcome": f"attack did not run: {line}",
            "error": line,
            "traceback": "".join(tb)[-1500:],
        }
    finally:
        if target == "baseline":
            await env.baseline.close()
        else:
            await env.trustmig.stop_all()


async def _run(
    env: LabEnv, attacks: list[Attack], say: Say, on_result: OnResult | None
) -> list[dict[str, Any]]:
    results = []
    for i, attack in enumerate(attacks, 1):
        entry: dict[str, Any] = {
            "name": attack.name,
            "title": attack.title,
            "paper": attack.paper,
            "x805": attack.cells(),
        }
        for target in ("baseline", "trustmig"):
            say(f"[{i}/{len(attacks)}] {attack.name} against {target}")
            entry[target] = await _one(env, attack, target)
            entry[f"{target}_compromised"] = entry[target]["compromised"]
        errors = [entry[t].get("error") for t in ("baseline", "trustmig") if entry[t].get("error")]
        entry["error"] = "; ".join(errors) if errors else None
        results.append(entry)
        if on_result:
            on_result(entry)
    return results


def run_lab(
    names: list[str] | None = None,
    *,
    workdir: Path | None = None,
    say: Say = lambda s: None,
    on_result: OnResult | None = None,
) -> dict[str, Any]:
    """Run the selected attacks and return the report (schema: docs/lab.md)."""
    attacks = select(names)
    t0 = time.monotonic()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    tmp = tempfile.TemporaryDirectory(prefix="trustmig-lab-") if workdir is None else None
    root = Path(tmp.name) if tmp is not None else Path(workdir).resolve()  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    env = LabEnv(root, say)
    try:
        env.start()
        results = asyncio.run(_run(env, attacks, say, on_result))
    finally:
        env.close()
        if tmp is not None:
            tmp.cleanup()
    return {
        "version": 1,
        "started": started,
        "duration_s": round(time.monotonic() - t0, 1),
        "platform": {
            "accel": env.accel.accel,
            "qemu": _qemu_version(),
            "host": platform.node(),
            "warning": env.accel.warning,
        },
        "attacks": results,
        "summary": {
            "attacks": len(results),
            "baseline_compromised": sum(1 for r in results if r["baseline_compromised"]),
            "trustmig_compromised": sum(1 for r in results if r["trustmig_compromised"]),
            "errors": sum(1 for r in results if r["error"]),
        },
    }
