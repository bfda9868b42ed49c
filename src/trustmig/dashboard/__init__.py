"""The operator's web view of the cluster (``trustmig dashboard``): see :mod:`.app`."""

from trustmig.dashboard.app import Dashboard, DashboardError, require_loopback, serve
from trustmig.dashboard.collect import ClusterReader, HostRaw
from trustmig.dashboard.view import cluster_view

__all__ = [
    "ClusterReader",
    "Dashboard",
    "DashboardError",
    "HostRaw",
    "cluster_view",
    "require_loopback",
    "serve",
]
