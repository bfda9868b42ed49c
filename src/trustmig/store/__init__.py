"""The cluster store: which host owns each VM (a compare-and-swap on owner and epoch), the
cluster-wide quarantine, hosts' verdicts, capacity and load, migrations and audit heads.

SQLAlchemy on PostgreSQL for a cluster (``postgresql+psycopg://``), SQLite for a single host.
Imports no other trustmig package.
"""

from trustmig.store.errors import OwnershipConflict, StoreError, StoreUnavailable
from trustmig.store.store import ClusterStore, HeadCheck, VmRecord

__all__ = [
    "ClusterStore",
    "HeadCheck",
    "OwnershipConflict",
    "StoreError",
    "StoreUnavailable",
    "VmRecord",
]
