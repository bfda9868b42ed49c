"""Role-based migration policy (the Policy Service): who may migrate which VM where.

The source host evaluates migrate-out against the VM's policy; the destination evaluates
migrate-in against the signed VM policy that travelled with the VM and its own host policy.
Every decision is ALLOW or DENY with the rule that decided it; the default is DENY.
See docs/policy.md for formats and the rule order.
"""

from trustmig.policy.access import (
    AccessDecision,
    VmAction,
    VmOwnership,
    decide_vm_access,
    may_see_tenant,
    owner_for_new_vm,
)
from trustmig.policy.check import check_policy_file, summarize_host_policy, summarize_vm_policy
from trustmig.policy.coresidency import CoResidencyDecision, Neighbour, decide_co_residency
from trustmig.policy.decision import (
    MIGRATE_IN,
    MIGRATE_OUT,
    Decision,
    MigrationRequest,
    decide_migrate_in,
    decide_migrate_out,
)
from trustmig.policy.errors import (
    InvalidRequestError,
    PolicyError,
    PolicySignatureError,
    PolicyStaleError,
)
from trustmig.policy.history import MigrationHistory
from trustmig.policy.identity import (
    KNOWN_ROLES,
    ROLE_AUDITOR,
    ROLE_OPERATOR,
    ROLE_OWNER,
    ROLE_SECURITY_ADMIN,
    Principal,
)
from trustmig.policy.loading import (
    PolicyFormat,
    load_host_policy,
    load_vm_policy,
    parse_host_policy,
    parse_vm_policy,
)
from trustmig.policy.models import (
    AcceptRules,
    AttestationRules,
    CoResidencyRules,
    DestinationRules,
    HostLabels,
    HostPolicy,
    MigrateRules,
    VmPolicy,
)
from trustmig.policy.signing import SignedPolicy, sign_policy, verify_signed_policy
from trustmig.policy.windows import TimeWindow, parse_window

__all__ = [
    "KNOWN_ROLES",
    "MIGRATE_IN",
    "MIGRATE_OUT",
    "ROLE_AUDITOR",
    "ROLE_OPERATOR",
    "ROLE_OWNER",
    "ROLE_SECURITY_ADMIN",
    "AcceptRules",
    "AccessDecision",
    "AttestationRules",
    "CoResidencyDecision",
    "CoResidencyRules",
    "Decision",
    "DestinationRules",
    "HostLabels",
    "HostPolicy",
    "InvalidRequestError",
    "MigrateRules",
    "MigrationHistory",
    "MigrationRequest",
    "Neighbour",
    "PolicyError",
    "PolicyFormat",
    "PolicySignatureError",
    "PolicyStaleError",
    "Principal",
    "SignedPolicy",
    "TimeWindow",
    "VmAction",
    "VmOwnership",
    "VmPolicy",
    "check_policy_file",
    "decide_co_residency",
    "decide_migrate_in",
    "decide_migrate_out",
    "decide_vm_access",
    "load_host_policy",
    "load_vm_policy",
    "may_see_tenant",
    "owner_for_new_vm",
    "parse_host_policy",
    "parse_vm_policy",
    "parse_window",
    "sign_policy",
    "summarize_host_policy",
    "summarize_vm_policy",
    "verify_signed_policy",
]
