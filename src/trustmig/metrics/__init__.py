"""Metrics for the ecosystem's monitoring (Prometheus, Grafana): see :mod:`.agent`."""

from trustmig.metrics.agent import GUARD_ADMITTING_RULES, AgentMetrics, StateSample

__all__ = ["GUARD_ADMITTING_RULES", "AgentMetrics", "StateSample"]
