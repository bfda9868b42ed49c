"""Measured load: what this host's guests really use, signed and quoted, and the judging of a
peer's report.

A planner must not act on what hosts advertise (the paper's false-resources attack, §7.5).
``host.report`` answers a nonce with the host's capacity and every guest's admitted size,
resident memory (``/proc/PID/status``) and CPU (``/proc/PID/stat``), signed with the host's
identity key, plus a TPM quote over the nonce and the report's bytes, so the asker can read the
host's *attested* capacity from the quote's event log and hold the report to it
(:func:`trustmig.guard.reports.check_report`). A host whose report is a lie is quarantined by
the asker, exactly like a destination whose resource claim lies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.agent.capacity import host_capacity, parse_capacity
from trustmig.agent.claim_check import summary_field
from trustmig.agent.control import Operations, Request
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.vms import HOLDING, VmManager
from trustmig.attest.errors import AttestationFailed
from trustmig.config import HostConfig
from trustmig.guard.claims import AttestedCapacity
from trustmig.guard.errors import ClaimError
from trustmig.guard.reports import (
    LYING_RULES,
    HostReport,
    VmUse,
    check_report,
    sign_report,
    verify_report_signature,
)

_QUOTE_PURPOSE = b"trustmig-host-report-quote-v1\n"
_NONCE = re.compile(r"^[0-9a-f]{32,128}$")
_TICKS = os.sysconf("SC_CLK_TCK")


def quote_digest(nonce: str, report: HostReport) -> bytes:
    """What the TPM quote of a report covers: the asker's nonce and the signed bytes."""
    return hashlib.sha256(
        _QUOTE_PURPOSE + nonce.encode() + b"\n" + report.canonical_bytes()
    ).digest()


# ---------------------------------------------------------------------------------- measuring
def _proc_cpu_and_start(pid: int) -> tuple[float, float] | None:
    """(CPU seconds used, start time in seconds since boot) of a process, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the command: state is field 3, utime 14, stime 15, starttime 22 (1-based)
    utime, stime, start = int(fields[11]), int(fields[12]), int(fields[19])
    return (utime + stime) / _TICKS, start / _TICKS


def _proc_rss_mib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _uptime() -> float:
    with open("/proc/uptime", encoding="ascii") as fh:
        return float(fh.read().split()[0])


#: the shortest window a CPU rate is measured over: the kernel counts in 10 ms ticks, so a
#: shorter one would turn one busy tick into many cores (and asking often must not do that)
MIN_WINDOW_S = 2.0


class UseMeter:
    """CPU in cores per process over windows of at least ``MIN_WINDOW_S`` (the first: since
    it started); asked again sooner, it answers the last completed window's rate."""

    def __init__(self, clock: Callable[[], float] = _uptime) -> None:
        self.clock = clock
        self._last: dict[int, tuple[float, float, float]] = {}  # pid -> (t, cpu, rate)

    def cores(self, pid: int, limit: float) -> float:
        """The rate, never above ``limit`` (the guest's vCPUs plus QEMU's own threads)."""
        sample = _proc_cpu_and_start(pid)
        if sample is None:
            self._last.pop(pid, None)
            return 0.0
        cpu, started = sample
        now = self.clock()
        prev_t, prev_cpu, prev_rate = self._last.get(pid, (started, 0.0, -1.0))
        if now - prev_t < MIN_WINDOW_S and prev_rate >= 0:
            return prev_rate
        rate = min(limit, max(0.0, cpu - prev_cpu) / max(now - prev_t, MIN_WINDOW_S))
        self._last[pid] = (now, cpu, rate)
        return rate


def current_report(cfg: HostConfig, guests: list[VmUse], nonce: str) -> HostReport:
    """This host's honest report (the lab's lying agent replaces this function)."""
    cap = host_capacity(cfg)
    return HostReport(
        host=cfg.name,
        nonce=nonce,
        ts=time.time(),
        total_mem_mib=cap.mem_mib,
        total_vcpus=cap.vcpus,
        host_cpu_cores=round(sum(g.cpu_cores for g in guests), 3),
        vms=tuple(guests),
    )


class HostReporter:
    """Serves ``host.report`` to peers and operators."""

    def __init__(
        self,
        cfg: HostConfig,
        vms: VmManager,
        key: ec.EllipticCurvePrivateKey,
        make_evidence: Callable[[bytes], bytes] | None,
    ) -> None:
        self.cfg = cfg
        self.vms = vms
        self.key = key
        self.make_evidence = make_evidence
        self.meter = UseMeter()
        #: a VM's co-residency rules from its verified policy (neighbours, tenants refused)
        self.co_residency: Callable[[str], tuple[str, tuple[str, ...]]] = lambda vm: ("any", ())

    def register(self, ops: Operations) -> None:
        # peers only: a report names every tenant's guests on the host
        ops.add("host.report", self.report_op, kinds=("host",))

    def guests(self) -> list[VmUse]:
        out = []
        for vm in sorted(self.vms.visible(), key=lambda v: v.name):
            if vm.state not in HOLDING:
                continue
            pid = vm.qemu.pid
            neighbours, never = self.co_residency(vm.name)
            out.append(VmUse(
                name=vm.name, mem_mib=vm.spec.memory_mib, vcpus=vm.spec.vcpus,
                rss_mib=_proc_rss_mib(pid) if pid else 0,
                cpu_cores=round(self.meter.cores(pid, vm.spec.vcpus + 0.5), 3) if pid else 0.0,
                tenant=vm.spec.tenant, neighbours=neighbours, never_with=never,
            ))  # fmt: skip
        return out

    async def report_op(self, req: Request) -> dict[str, Any]:
        nonce = str(req.param("nonce"))
        if not _NONCE.match(nonce):
            raise RequestError("host.report: nonce must be 32-128 lowercase hex digits",
                               Code.INVALID)  # fmt: skip
        report = current_report(self.cfg, self.guests(), nonce)
        evidence = None
        if self.make_evidence is not None:  # a TPM quote takes tens of ms: off the loop
            quote = await asyncio.to_thread(self.make_evidence, quote_digest(nonce, report))
            evidence = base64.b64encode(quote).decode()
        signature = base64.b64encode(sign_report(report, self.key)).decode()
        return {"report": report.to_json(), "signature": signature, "evidence": evidence}


# ---------------------------------------------------------------------------------- judging
@dataclass(frozen=True)
class ReportJudgement:
    """The asker's verdict on one host's report: ``lie`` means quarantine it."""

    host: str
    accept: bool
    rule: str
    reason: str
    report: HostReport | None
    attested: AttestedCapacity | None

    @property
    def lie(self) -> bool:
        return not self.accept and self.rule in LYING_RULES

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host, "accept": self.accept, "rule": self.rule, "reason": self.reason,
            "lie": self.lie, "report": None if self.report is None else self.report.to_json(),
            "attested": None if self.attested is None else self.attested.__dict__,
        }  # fmt: skip


def judge_host_report(answer: Any, **kw: Any) -> ReportJudgement:
    """Check a ``host.report`` answer; never raises for bad input (a bad report is a verdict).
    Keywords as for :func:`_judge`."""
    try:
        return _judge(answer, **kw)
    except Exception as e:  # noqa: BLE001 - whatever a peer sends is a verdict, never a crash
        reason = f"host {kw.get('host')} report unreadable: {type(e).__name__}: {e}"
        return ReportJudgement(str(kw.get("host")), False, "report_malformed", reason, None, None)


def _judge(
    answer: Any,
    *,
    host: str,
    peer_cert_der: bytes,
    nonce: str,
    verify_evidence: Callable[[str, bytes, bytes], str] | None,
    known: dict[str, tuple[int, int]],
) -> ReportJudgement:
    """The checks of one report.

    ``verify_evidence`` is this host's attestation (None: attestation off, the report is held
    only to its own capacity); ``known``: the VMs the cluster placed on ``host``."""

    def verdict(
        rule: str,
        reason: str,
        report: HostReport | None = None,
        attested: AttestedCapacity | None = None,
        ok: bool = False,
    ) -> ReportJudgement:
        return ReportJudgement(host, ok, rule, reason, report, attested)  # fmt: skip

    try:
        report = HostReport.from_json(answer["report"])
        sig = base64.b64decode(str(answer["signature"]), validate=True)
    except (ClaimError, KeyError, TypeError, ValueError, binascii.Error) as e:
        return verdict("report_malformed", f"host {host} report unreadable: {e}")
    if report.host != host:
        return verdict("report_malformed", f"host {host} sent a report for {report.host}")
    key = x509.load_der_x509_certificate(peer_cert_der).public_key()
    try:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ClaimError(f"host {host} certificate has no ECDSA key")
        verify_report_signature(report, sig, key)
    except ClaimError as e:
        return verdict("report_signature", str(e), report)
    attested, problem = _attested(answer, host, nonce, report, verify_evidence)
    if attested is None:
        return verdict("report_unattested", problem, report)
    v = check_report(report, attested=attested, known=known, now=time.time(),
                     expected_nonce=nonce)  # fmt: skip
    return verdict(v.rule, v.reason, report, attested, v.accept)


def _attested(
    answer: Any, host: str, nonce: str, report: HostReport,
    verify_evidence: Callable[[str, bytes, bytes], str] | None,
) -> tuple[AttestedCapacity | None, str]:  # fmt: skip
    if verify_evidence is None:  # attestation off: the report can only agree with itself
        return AttestedCapacity(report.total_mem_mib, report.total_vcpus), ""
    raw = answer.get("evidence")
    if not isinstance(raw, str):
        return None, f"host {host} sent no TPM quote with its report"
    try:
        summary = verify_evidence(host, base64.b64decode(raw, validate=True),
                                  quote_digest(nonce, report))  # fmt: skip
    except (AttestationFailed, ValueError, binascii.Error) as e:
        return None, f"host {host} report's quote failed: {e}"
    attested = parse_capacity(summary_field(summary, "capacity"))
    if attested is None:
        return None, f"host {host}'s quote carries no capacity measurement"
    return attested, ""


# ---------------------------------------------------------------------------------- asking
async def _nothing_known(host: str) -> dict[str, tuple[int, int]]:
    return {}


class ClusterLoads:
    """``cluster.loads``: ask every peer for its report, judge each, quarantine the liars.

    With a cluster store, a report must account for every VM the store places on its host
    (``known``), and the verdicts and verified loads are kept in the store."""

    PEER_TIMEOUT_S = 10.0

    def __init__(
        self,
        peers: list[str],
        connect_peer: Callable[[str], Any],
        verify_evidence: Callable[[str, bytes, bytes], str] | None,
        quarantine: Any,
        audit: Callable[..., None],
    ) -> None:
        self.peers = peers
        self.connect_peer = connect_peer
        self.verify_evidence = verify_evidence
        self.quarantine = quarantine
        self.audit = audit
        #: the cluster store's records of which VMs run on a host (none without a store)
        self.known: Callable[[str], Awaitable[dict[str, tuple[int, int]]]] = _nothing_known
        #: called with every round of judged reports (the cluster store keeps them)
        self.on_judged: Callable[[list[ReportJudgement]], Awaitable[None]] | None = None

    def register(self, ops: Operations) -> None:
        ops.add("cluster.loads", self.loads_op, roles=("cluster-admin", "security-admin"))

    async def loads_op(self, req: Request) -> dict[str, Any]:
        return {"hosts": [j.to_json() for j in await self.ask_all()]}

    async def ask_all(self) -> list[ReportJudgement]:
        """Every peer's judged report, in peer order (kept in the store when there is one)."""
        judged = []
        for peer in self.peers:
            try:
                judged.append(await self.ask(peer))
            except Exception as e:  # noqa: BLE001 - one peer never stops the others' verdicts
                judged.append(ReportJudgement(peer, False, "report_malformed",
                                              f"{type(e).__name__}: {e}", None, None))  # fmt: skip
        if self.on_judged is not None:
            await self.on_judged(judged)
        return judged

    async def ask(self, peer: str) -> ReportJudgement:
        """One peer's judged report (an unreachable peer is a verdict too, never a lie)."""
        nonce = os.urandom(16).hex()
        try:
            client = await asyncio.wait_for(self.connect_peer(peer), self.PEER_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a peer that is down is reported as such
            return ReportJudgement(peer, False, "report_unreachable", str(e), None, None)
        try:
            ssl_obj = client.ssl_object
            cert = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
            answer = await client.call("host.report", {"nonce": nonce},
                                       timeout=self.PEER_TIMEOUT_S)  # fmt: skip
        except Exception as e:  # noqa: BLE001
            return ReportJudgement(peer, False, "report_unreachable", str(e), None, None)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        if not cert:
            why = "the control connection carried no certificate"
            return ReportJudgement(peer, False, "report_unreachable", why, None, None)
        known = await self.known(peer)
        judged = await asyncio.to_thread(
            judge_host_report, answer, host=peer, peer_cert_der=cert, nonce=nonce,
            verify_evidence=self.verify_evidence, known=known)  # fmt: skip
        if judged.lie:
            self.quarantine.add(peer, f"{judged.rule}: {judged.reason}")
            data = {"host": peer, "reason": judged.reason, "rule": judged.rule}
            self.audit("guard.quarantine", outcome="quarantined", data=data)
        return judged
