"""The migration as explicit, sans-IO state machines, one per side.

:mod:`trustmig.migration.source` and :mod:`trustmig.migration.destination` hold the states, the
named state sets (terminal, holds resources, guest may be killed, in doubt), the allowed
transitions and the cores; :mod:`~trustmig.migration.events` and
:mod:`~trustmig.migration.actions` are what goes in and out. Nothing here does I/O, reads a
clock or imports asyncio, sockets, threads or QEMU code: the agent drives the cores.
"""

from trustmig.migration.core import MigrationCore, TransitionError
from trustmig.migration.destination import DestinationCore, DestinationPlan, DestinationState
from trustmig.migration.source import SourceCore, SourcePlan, SourceState

__all__ = [
    "DestinationCore",
    "DestinationPlan",
    "DestinationState",
    "MigrationCore",
    "SourceCore",
    "SourcePlan",
    "SourceState",
    "TransitionError",
]
