"""Who asks for a migration: the principal shape and the role names the policy understands.

Identities are issued by the cluster PKI (``PeerIdentity``). The policy package does not import
the PKI; it accepts any object with ``name``, ``roles`` and ``tenant`` so that decisions can be
made (and tested) without certificates, and so that the PKI can evolve independently.
"""

from __future__ import annotations

from typing import Final, Protocol, runtime_checkable

ROLE_OWNER: Final = "owner"
"""Owns given VMs; the role only counts for a VM whose policy names this user as ``owner``."""
ROLE_OPERATOR: Final = "operator"
"""Migrates VMs for maintenance when a VM policy allows operators."""
ROLE_SECURITY_ADMIN: Final = "security-admin"
"""Manages policies, reference values and hosts; may sign any VM policy."""
ROLE_AUDITOR: Final = "auditor"
"""Reads the audit trail only. Separation of duty: holding this role forbids migrating."""
ROLE_TENANT_ADMIN: Final = "tenant-admin"
"""Administers every VM of its own tenant: signs their policies, transfers their ownership."""
ROLE_CLUSTER_ADMIN: Final = "cluster-admin"
"""Operates every VM of every tenant (start, stop, migrate, resolve); signs no policy."""

KNOWN_ROLES: Final = frozenset(
    {ROLE_OWNER, ROLE_OPERATOR, ROLE_SECURITY_ADMIN, ROLE_AUDITOR, ROLE_TENANT_ADMIN,
     ROLE_CLUSTER_ADMIN}
)  # fmt: skip
MIGRATING_ROLES: Final = frozenset(
    {ROLE_OWNER, ROLE_OPERATOR, ROLE_SECURITY_ADMIN, ROLE_TENANT_ADMIN, ROLE_CLUSTER_ADMIN}
)
"""Roles a VM policy may list in ``migrate.allowed_roles`` (never ``auditor``)."""


@runtime_checkable
class Principal(Protocol):
    """Anything identifying a user: ``PeerIdentity`` from the PKI satisfies this."""

    @property
    def name(self) -> str: ...

    @property
    def roles(self) -> tuple[str, ...]: ...

    @property
    def tenant(self) -> str | None: ...


def describe_roles(principal: Principal) -> str:
    """Render roles as ``[a, b]`` for decision lines (stable order, readable when empty)."""
    return "[" + ", ".join(sorted(principal.roles)) + "]"
