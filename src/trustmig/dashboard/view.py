"""The dashboard's view model: the agents' raw answers turned into what a page shows (pure).

A host's attestation state is what its *peers* last concluded from its TPM evidence (a host's
word about itself is not shown as trust), and a host is shown quarantined if any agent
quarantines it, with who did and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trustmig.dashboard.collect import HostRaw

TERMINAL = frozenset({"completed", "rolled-back", "refused", "failed", "committed", "aborted"})
MIB = 1024 * 1024


def cluster_view(hosts: Mapping[str, HostRaw], lab: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the page shows, as plain data (also what ``--json`` prints)."""
    raws = sorted(hosts.values(), key=lambda h: h.name)
    migrations = [m for h in raws for m in _migrations(h)]
    live = [m for m in migrations if m["state"] not in TERMINAL and m["role"] == "source"]
    done = sorted((m for m in migrations if m["state"] in TERMINAL),
                  key=lambda m: -(m.get("updated_at") or 0))  # fmt: skip
    return {
        "hosts": [_host(h, raws) for h in raws],
        "vms": [v for h in raws for v in _vms(h)],
        "live": live,
        "history": done[:30],
        "audit": [_audit(h) for h in raws],
        "guard": [_guard(h) for h in raws],
        "lab": lab,
    }


def _answer(h: HostRaw, key: str) -> dict[str, Any]:
    got = h.answers.get(key)
    return got if isinstance(got, dict) else {}


def _host(h: HostRaw, raws: list[HostRaw]) -> dict[str, Any]:
    status = _answer(h, "status")
    return {
        "name": h.name,
        "address": h.address,
        "reachable": h.reachable,
        "error": h.error,
        "accel": status.get("accel"),
        "metrics": status.get("metrics"),
        "attestation": attestation_of(h.name, raws),
        "quarantined_by": quarantined_by(h.name, raws),
        "vms": len(status.get("vms") or []),
        "store": (status.get("store") or {}).get("reachable"),
    }


def attestation_of(name: str, raws: list[HostRaw]) -> dict[str, Any]:
    """The latest verdict any peer reached on ``name``'s evidence."""
    latest: dict[str, Any] | None = None
    for peer in raws:
        results = ((_answer(peer, "status").get("attestation") or {}).get("last_results")) or {}
        r = results.get(name)
        at = float(r.get("at") or 0) if isinstance(r, dict) else 0.0
        if isinstance(r, dict) and (latest is None or at > latest["at"]):
            state = "verified" if r.get("ok") else "refused"
            latest = {"state": state, "by": peer.name, "at": at,
                      "detail": str(r.get("summary") or "")}  # fmt: skip
    return latest or {"state": "unknown", "by": None, "at": 0.0,
                      "detail": "no peer has judged its evidence yet"}  # fmt: skip


def quarantined_by(name: str, raws: list[HostRaw]) -> list[dict[str, str]]:
    out = []
    for peer in raws:
        q = (_answer(peer, "quarantine").get("quarantined")) or {}
        if name in q:
            out.append({"by": peer.name, "reason": str((q[name] or {}).get("reason") or "")})
    return out


def _vms(h: HostRaw) -> list[dict[str, Any]]:
    out = []
    for v in _answer(h, "status").get("vms") or []:
        out.append({"name": v.get("name"), "host": h.name, "state": v.get("state"),
                    "tenant": v.get("tenant"), "memory_mib": v.get("memory_mib"),
                    "migration": v.get("migration")})  # fmt: skip
    return out


def _migrations(h: HostRaw) -> list[dict[str, Any]]:
    rows = _answer(h, "migrations").get("migrations") or []
    return [migration_row(h.name, r) for r in rows if isinstance(r, dict)]


def migration_row(host: str, r: dict[str, Any]) -> dict[str, Any]:
    """A migration with its progress as percentages and MiB (RAM and disk)."""
    role = r.get("role")
    src, dst = (host, r.get("peer")) if role == "source" else (r.get("peer"), host)
    row = {k: r.get(k) for k in ("migration_id", "vm", "state", "role", "mode", "channel",
                                 "error", "user", "updated_at")}  # fmt: skip
    row |= {"source": src, "destination": dst, "reported_by": host, "ram": None, "disk": None}
    p = r.get("progress") or {}
    total = int(p.get("total") or 0)
    if total > 0:
        remaining = int(p.get("remaining") or 0)
        row["ram"] = {
            "percent": round(100.0 * (total - remaining) / total, 1),
            "transferred_mib": int(p.get("transferred") or 0) // MIB,
            "total_mib": total // MIB,
            "dirty_mibps": round(int(p.get("dirty_rate_pps") or 0) * 4096 / MIB, 1),
            "expected_downtime_ms": p.get("expected_downtime_ms"),
            "rounds": p.get("rounds"),
        }
    d = r.get("disk_progress") or {}
    if int(d.get("total") or 0) > 0:
        row["disk"] = {"percent": round(100.0 * int(d.get("transferred") or 0) / int(d["total"]),
                                        1)}  # fmt: skip
    return row


def _audit(h: HostRaw) -> dict[str, Any]:
    none = {"events": None, "checkpoints": None, "anchor": None}
    if "audit.verify" in h.denied:
        return {"host": h.name, "state": "not permitted", "detail": h.denied["audit.verify"],
                **none}  # fmt: skip
    a = h.audit
    if not isinstance(a, dict):
        return {"host": h.name, "state": "unknown", "detail": "not verified yet", **none}
    anchor = (a.get("anchor") or {}).get("code")
    problems = a.get("problems") or []
    return {"host": h.name, "state": "intact" if a.get("ok") else "broken",
            "events": a.get("events"), "checkpoints": a.get("checkpoints"), "anchor": anchor,
            "detail": problems[0] if problems else ""}  # fmt: skip


def _guard(h: HostRaw) -> dict[str, Any]:
    g = _answer(h, "guard")
    guard = g.get("guard") or {}
    counters = guard.get("counters") or {}
    refusals = {k: v for k, v in counters.items() if k not in ("accept", "proven", "closed")}
    adm = g.get("admission") or {}
    queued = sum(len(v) for v in (adm.get("queued") or {}).values())
    running = sum(len(v) for v in (adm.get("running") or {}).values())
    return {"host": h.name, "refusals": dict(sorted(refusals.items(), key=lambda kv: -kv[1])),
            "accepted": counters.get("accept", 0), "summary": guard.get("summary") or {},
            "admission_running": running, "admission_queued": queued,
            "denied": "guard.show" in h.denied}  # fmt: skip
