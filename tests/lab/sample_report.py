"""A realistic lab report dict (nine attacks from the survey paper) for renderer tests.

Built by a function, not a module constant, so each test may mutate its own copy.
"""

from __future__ import annotations

from typing import Any

ATTACK_NAMES = (
    "eavesdrop",
    "memory_rewrite",
    "replay",
    "unauthorized",
    "rogue_destination",
    "false_resources",
    "flood",
    "malformed_stream",
    "connection_abort",
)


def _cells(*triples: str) -> list[dict[str, str]]:
    """``"dimension/layer/plane"`` strings to x805 entries."""
    out = []
    for t in triples:
        dimension, layer, plane = t.split("/")
        out.append({"dimension": dimension, "layer": layer, "plane": plane})
    return out


def _guest(copies: int, where: str, intact: bool = True, heartbeat: bool = True) -> dict[str, Any]:
    return {
        "running_copies": copies,
        "where": where,
        "memory_intact": intact,
        "heartbeat_continued": heartbeat,
    }


def _result(
    compromised: bool, outcome: str, evidence: Any, guest: dict[str, Any], duration: float
) -> dict[str, Any]:
    return {
        "compromised": compromised,
        "outcome": outcome,
        "evidence": evidence,
        "guest": guest,
        "duration_s": duration,
    }


def _attack(
    name: str,
    title: str,
    paper: str,
    x805: list[dict[str, str]],
    baseline: dict[str, Any],
    trustmig: dict[str, Any],
) -> dict[str, Any]:
    return {
        "name": name,
        "title": title,
        "paper": paper,
        "x805": x805,
        "baseline_compromised": baseline["compromised"],
        "trustmig_compromised": trustmig["compromised"],
        "baseline": baseline,
        "trustmig": trustmig,
        "error": None,
    }


def _attacks() -> list[dict[str, Any]]:
    dst, src = "destination", "source"
    return [
        _attack(
            "eavesdrop",
            "Eavesdropping on the migration stream",
            "Migration traffic in clear text exposes guest memory (keys, passwords) to a "
            "passive observer on the network.",
            _cells(
                "data_confidentiality/infrastructure/end_user",
                "data_confidentiality/services/end_user",
                "privacy/infrastructure/end_user",
                "communication_security/infrastructure/end_user",
            ),
            _result(True, "secret found in stream 3 times", {"hits": 3}, _guest(1, dst), 4.1),
            _result(False, "no plaintext secret seen", {"hits": 0}, _guest(1, dst), 5.3),
        ),
        _attack(
            "memory_rewrite",
            "Rewriting guest memory in transit (Xensploit)",
            "A man in the middle modifies memory pages in flight to implant code in the guest.",
            _cells(
                "data_integrity/infrastructure/end_user",
                "data_integrity/services/end_user",
                "communication_security/infrastructure/end_user",
            ),
            _result(True, "marker rewritten in guest", {"rewrites": 1}, _guest(1, dst, False), 4.4),
            _result(
                False,
                "tampered record rejected, migration aborted",
                {"rewrites": 1, "rejected": "AEAD tag mismatch"},
                _guest(1, src),
                3.9,
            ),
        ),
        _attack(
            "replay",
            "Replaying a recorded migration",
            "An attacker replays an old migration stream to roll a VM back to a stale state.",
            _cells(
                "data_integrity/services/control",
                "authentication/services/control",
                "non_repudiation/services/control",
            ),
            _result(
                True, "stale VM resurrected", {"replayed_bytes": 52_428_800}, _guest(2, "both"), 6.0
            ),
            _result(
                False,
                "replayed session nonce refused",
                {"reason": "nonce reuse"},
                _guest(1, src),
                1.2,
            ),
        ),
        _attack(
            "unauthorized",
            "Migration initiated by an unauthorised user",
            "Weak access control lets any user on the management network start migrations.",
            _cells(
                "access_control/services/management",
                "access_control/applications/management",
                "authentication/applications/management",
                "non_repudiation/applications/management",
            ),
            _result(
                True, "migration accepted without credentials", {"user": None}, _guest(1, dst), 3.0
            ),
            _result(
                False, "policy denied: no role operator", {"user": "mallory"}, _guest(1, src), 0.4
            ),
        ),
        _attack(
            "rogue_destination",
            "Migrating to a rogue destination host",
            "Without mutual authentication, a VM can be lured to an attacker-controlled host.",
            _cells(
                "authentication/infrastructure/control",
                "authentication/services/control",
                "access_control/services/control",
            ),
            _result(
                True, "VM now runs on rogue host", {"peer": "10.0.0.66"}, _guest(1, "rogue"), 3.5
            ),
            _result(
                False,
                "attestation failed: unknown PCR digest",
                {"peer": "10.0.0.66"},
                _guest(1, src),
                1.8,
            ),
        ),
        _attack(
            "false_resources",
            "False resource advertising",
            "A host advertises resources it does not have to attract VMs (and then starve them).",
            _cells(
                "authentication/infrastructure/management",
                "access_control/infrastructure/management",
                "availability/services/management",
            ),
            _result(
                True,
                "VM placed on over-committed host",
                {"advertised_mb": 65536},
                _guest(1, dst),
                2.2,
            ),
            _result(
                False, "signed inventory mismatch", {"advertised_mb": 65536}, _guest(1, src), 0.9
            ),
        ),
        _attack(
            "flood",
            "Flooding the migration endpoint",
            "Denial of service against the migration service stalls or aborts migrations.",
            _cells(
                "availability/infrastructure/control",
                "availability/services/control",
                "availability/infrastructure/end_user",
            ),
            _result(
                True,
                "migration stalled > 60 s",
                {"connections": 4096},
                _guest(1, src, True, False),
                61.0,
            ),
            _result(
                False,
                "flood rate-limited, migration completed",
                {"dropped": 4090},
                _guest(1, dst),
                7.5,
            ),
        ),
        _attack(
            "malformed_stream",
            "Malformed migration stream",
            "Crafted device state exploits parser bugs in the destination hypervisor.",
            _cells("data_integrity/infrastructure/control", "availability/services/end_user"),
            _result(
                True,
                "destination QEMU crashed",
                {"signal": "SIGSEGV"},
                _guest(0, "none", False, False),
                2.7,
            ),
            _result(
                False, "stream rejected before QEMU", {"frames_rejected": 1}, _guest(1, src), 0.6
            ),
        ),
        _attack(
            "connection_abort",
            "Aborting the connection mid-migration",
            "Cutting the stream must not lose the VM or leave two running copies.",
            _cells(
                "availability/infrastructure/end_user",
                "availability/applications/end_user",
            ),
            _result(False, "source resumed", {"cut_at_bytes": 1_048_576}, _guest(1, src), 2.0),
            _result(
                False,
                "source resumed, receipt logged",
                {"cut_at_bytes": 1_048_576},
                _guest(1, src),
                2.1,
            ),
        ),
    ]


def sample_report() -> dict[str, Any]:
    """A complete version-1 lab report: 9 attacks, baseline compromised by 8, trustmig by 0."""
    attacks = _attacks()
    return {
        "version": 1,
        "started": "2026-11-27T04:00:00Z",
        "duration_s": 123.4,
        "platform": {"accel": "tcg", "qemu": "7.2.x", "host": "lab-host"},
        "attacks": attacks,
        "summary": {
            "attacks": len(attacks),
            "baseline_compromised": sum(a["baseline_compromised"] for a in attacks),
            "trustmig_compromised": sum(a["trustmig_compromised"] for a in attacks),
            "errors": 0,
        },
    }
