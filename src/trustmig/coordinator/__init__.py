"""Cluster-wide plans (balance, consolidate) carried out with the operator's own rights.

:mod:`~trustmig.coordinator.view` builds one verified view from the hosts' answers (pure);
:mod:`~trustmig.coordinator.run` gathers those answers and runs a plan's moves under per-host
and cluster-wide caps; :mod:`~trustmig.coordinator.plans` makes a plan or checks a saved one.
"""

from trustmig.coordinator.plans import fresh_plan, replayed_plan
from trustmig.coordinator.run import Caps, Cluster, execute, gather
from trustmig.coordinator.view import Gathered, combine

__all__ = [
    "Caps",
    "Cluster",
    "Gathered",
    "combine",
    "execute",
    "fresh_plan",
    "gather",
    "replayed_plan",
]
