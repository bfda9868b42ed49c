"""An agent's metrics, in Prometheus' own model (``prometheus_client``), on a registry of its own.

Two sources feed it:

- **The audit stream.** Every decision and phase is audited already, so counters that follow
  decisions (migrations by outcome, policy decisions by rule, quarantines) are a fold over the
  events the agent records: :meth:`AgentMetrics.observe_audit`. A metric can then never count
  something the trail does not hold.
- **A snapshot at scrape time** for what is a level rather than an event: the guard's rule
  counters, the admission queue, quarantined hosts, the audit chain, VMs by state and the
  migrations in progress (:class:`StateSample`, read through a callable the agent provides).

Names follow Prometheus' conventions: base units (seconds, bytes), ``_total`` on counters, no VM
or tenant names in labels (a scrape must not reveal one tenant's VMs, and labels stay bounded).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: guard rules that admit or end a connection normally; every other rule is a refusal
GUARD_ADMITTING_RULES = frozenset({"accept", "proven", "closed"})
#: terminal migration phases, per role
TERMINAL_PHASES = {
    "source": frozenset({"completed", "rolled-back", "refused", "failed"}),
    "destination": frozenset({"committed", "aborted"}),
}
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_PAUSE = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_RATE = tuple(float(2**k * 1_000_000) for k in range(0, 14))  # 1 MB/s .. 8 GB/s
_REMEMBERED = 256


@dataclass(frozen=True)
class StateSample:
    """What the agent holds at one instant (levels, not events)."""

    guard_rules: Mapping[str, int] = field(default_factory=dict)
    admission_running: Mapping[str, int] = field(default_factory=dict)
    admission_queued: Mapping[str, int] = field(default_factory=dict)
    quarantined_hosts: int = 0
    audit_events: int = 0
    audit_last_verified: float | None = None
    audit_last_ok: bool | None = None
    vms_by_state: Mapping[str, int] = field(default_factory=dict)
    migrations_in_progress: Mapping[str, int] = field(default_factory=dict)


class AgentMetrics:
    """The counters and histograms of one agent; :attr:`registry` is what ``/metrics`` serves."""

    def __init__(self, host: str, sample: Callable[[], StateSample] | None = None) -> None:
        self.host = host
        self.registry = CollectorRegistry()
        r = self.registry
        self.migrations = Counter("trustmig_migrations", "Migrations that ended, by outcome.",
                                  ["role", "outcome", "channel", "mode"], registry=r)  # fmt: skip
        self.transferred = Counter("trustmig_migration_transferred_bytes",
                                   "Guest memory bytes QEMU sent in completed migrations.",
                                   ["channel"], registry=r)  # fmt: skip
        self.duration = Histogram("trustmig_migration_duration_seconds",
                                  "Completed migrations' total time (QEMU).",
                                  ["channel", "mode"], buckets=_SECONDS, registry=r)  # fmt: skip
        self.downtime = Histogram("trustmig_migration_downtime_seconds",
                                  "QEMU's downtime of completed migrations.",
                                  ["channel", "mode"], buckets=_PAUSE, registry=r)  # fmt: skip
        self.felt_pause = Histogram("trustmig_migration_guest_pause_seconds",
                                    "Largest gap between the guest's heartbeats across the switch.",
                                    ["channel", "mode"], buckets=_PAUSE, registry=r)  # fmt: skip
        self.throughput = Histogram("trustmig_migration_throughput_bytes_per_second",
                                    "Completed migrations' throughput.",
                                    ["channel"], buckets=_RATE, registry=r)  # fmt: skip
        self.handshake = Histogram("trustmig_channel_handshake_seconds",
                                   "Attested handshakes of the migration channel (source side).",
                                   buckets=_SECONDS, registry=r)  # fmt: skip
        self.attestation = Histogram("trustmig_attestation_duration_seconds",
                                     "Judging one peer's TPM evidence.",
                                     buckets=_SECONDS, registry=r)  # fmt: skip
        self.verdicts = Counter("trustmig_attestation_verdicts", "Peers' TPM evidence, judged.",
                                ["verdict"], registry=r)  # fmt: skip
        self.decisions = Counter("trustmig_policy_decisions", "Migration policy decisions.",
                                 ["direction", "rule", "outcome"], registry=r)  # fmt: skip
        self.quarantine_events = Counter("trustmig_quarantine_events",
                                         "Hosts quarantined, refused or cleared.",
                                         ["outcome"], registry=r)  # fmt: skip
        self.info = Gauge("trustmig_agent_info", "This agent (value 1).", ["host"], registry=r)
        self.info.labels(host=host).set(1)
        self._labels: OrderedDict[str, tuple[str, str]] = OrderedDict()
        if sample is not None:
            r.register(_StateCollector(sample))

    # ------------------------------------------------------------------ the audit stream
    def observe_audit(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Fold one audit event into the counters (never raises: metrics must not fail a
        decision)."""
        with contextlib.suppress(Exception):  # a malformed event only misses its count
            self._fold(kind, fields)

    def _fold(self, kind: str, fields: Mapping[str, Any]) -> None:
        data = fields.get("data") or {}
        mid = str(fields.get("migration_id") or "")
        if kind == "migrate.request":
            opts = data.get("options") or {}
            self._remember(mid, opts)
        elif kind == "policy.decision":
            if data.get("direction") == "migrate-in":
                self._remember(mid, data.get("options") or {})
            self.decisions.labels(str(data.get("direction")), str(data.get("rule")),
                                  str(fields.get("outcome"))).inc()  # fmt: skip
        elif kind == "migration.phase":
            role, phase = str(data.get("role")), str(fields.get("outcome"))
            if phase in TERMINAL_PHASES.get(role, ()):
                channel, mode = self._labels.get(mid, ("unknown", "unknown"))
                self.migrations.labels(role, phase, channel, mode).inc()
        elif kind == "migration.complete":
            self._completed(mid, data)
        elif kind == "guard.quarantine":
            self.quarantine_events.labels(str(fields.get("outcome"))).inc()

    def _remember(self, mid: str, opts: Mapping[str, Any]) -> None:
        if not mid:
            return
        self._labels[mid] = (str(opts.get("channel") or "secure"), str(opts.get("mode") or "?"))
        while len(self._labels) > _REMEMBERED:
            self._labels.popitem(last=False)

    def _completed(self, mid: str, data: Mapping[str, Any]) -> None:
        channel = str(data.get("channel") or self._labels.get(mid, ("unknown", "unknown"))[0])
        mode = str(data.get("mode") or "unknown")
        if isinstance(data.get("bytes_transferred"), int):
            self.transferred.labels(channel).inc(data["bytes_transferred"])
        if isinstance(data.get("total_ms"), int | float):
            self.duration.labels(channel, mode).observe(data["total_ms"] / 1000)
        if isinstance(data.get("downtime_ms"), int | float):
            self.downtime.labels(channel, mode).observe(data["downtime_ms"] / 1000)
        if isinstance(data.get("throughput_mbps"), int | float):
            self.throughput.labels(channel).observe(data["throughput_mbps"] * 1e6)
        if isinstance(data.get("handshake_ms"), int | float):
            self.handshake.observe(data["handshake_ms"] / 1000)

    # ------------------------------------------------------------------ direct observations
    def attested(self, ok: bool, seconds: float) -> None:
        self.verdicts.labels("verified" if ok else "refused").inc()
        self.attestation.observe(seconds)

    def guest_pause(self, channel: str, mode: str, seconds: float) -> None:
        self.felt_pause.labels(channel, mode).observe(seconds)


class _StateCollector(Collector):
    """Levels read from the agent at scrape time."""

    def __init__(self, sample: Callable[[], StateSample]) -> None:
        self.sample = sample

    def collect(self) -> Iterator[Metric]:
        s = self.sample()
        refused = CounterMetricFamily("trustmig_guard_refusals",
                                      "Connections the guard refused or dropped, by rule.",
                                      labels=["rule"])  # fmt: skip
        admitted = CounterMetricFamily("trustmig_guard_admissions",
                                       "Connections the guard admitted or ended normally.",
                                       labels=["rule"])  # fmt: skip
        for rule, n in sorted(s.guard_rules.items()):
            (admitted if rule in GUARD_ADMITTING_RULES else refused).add_metric([rule], n)
        yield refused
        yield admitted
        yield _gauge("trustmig_admission_running", "Migrations admitted and running.",
                     "direction", s.admission_running)  # fmt: skip
        yield _gauge("trustmig_admission_queued", "Migrations waiting for admission.",
                     "direction", s.admission_queued)  # fmt: skip
        yield GaugeMetricFamily("trustmig_quarantined_hosts", "Hosts quarantined now.",
                                value=s.quarantined_hosts)  # fmt: skip
        yield GaugeMetricFamily("trustmig_audit_chain_events", "Events in this host's audit chain.",
                                value=s.audit_events)  # fmt: skip
        if s.audit_last_verified is not None:
            yield GaugeMetricFamily("trustmig_audit_last_verification_timestamp_seconds",
                                    "When the audit chain was last verified (Unix time).",
                                    value=s.audit_last_verified)  # fmt: skip
        if s.audit_last_ok is not None:
            yield GaugeMetricFamily("trustmig_audit_last_verification_ok",
                                    "1 if the last verification found the chain intact.",
                                    value=1 if s.audit_last_ok else 0)  # fmt: skip
        yield _gauge("trustmig_vms", "VMs on this host, by state.", "state", s.vms_by_state)
        yield _gauge("trustmig_migrations_in_progress", "Migrations not yet ended, by role.",
                     "role", s.migrations_in_progress)  # fmt: skip


def _gauge(name: str, doc: str, label: str, values: Mapping[str, int]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=[label])
    for key, n in sorted(values.items()):
        g.add_metric([key], n)
    return g
