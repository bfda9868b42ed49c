"""``trustmig policy check``: validate a policy file and summarise what it permits.

The summary is meant for the administrator who just wrote the file: it restates the policy in
words so that an empty list ("nobody may migrate") or a missing limit is noticed before the
policy is provisioned.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from trustmig.policy.errors import PolicyError
from trustmig.policy.loading import (
    PolicyFormat,
    as_format,
    parse_host_policy,
    parse_vm_policy,
    read_policy_text,
)
from trustmig.policy.models import HostPolicy, VmPolicy
from trustmig.policy.signing import SignedPolicy, verify_signed_policy


def _list(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]" if items else "[]"


def summarize_vm_policy(policy: VmPolicy) -> str:
    """One-line restatement of a VM policy."""
    m, d = policy.migrate, policy.destinations
    who = f"users {_list(m.allowed_users)} or roles {_list(m.allowed_roles)}"
    if not m.allowed_users and not m.allowed_roles:
        who = "nobody (no allowed users or roles)"
    where = [
        f"hosts {_list(d.hosts)}" if d.hosts else "any host",
        f"countries {_list(d.countries)}" if d.countries else "any country",
        f"zones {_list(d.zones)}" if d.zones else "any zone",
        f"security level >= {d.min_security_level}",
    ]
    signed = f"; signed by {policy.signed_by}" if policy.signed_by else ""
    co = policy.co_residency
    near = {"any": "any neighbours", "tenant": "neighbours of its tenant only",
            "none": "a host of its own"}[co.neighbours]  # fmt: skip
    if co.never_with_tenants:
        near += f", never with tenants {_list(co.never_with_tenants)}"
    return (
        f"VM policy for {policy.vm} (tenant {policy.tenant}, owner {policy.owner}): "
        f"migrate by {who}; post-copy {'allowed' if m.postcopy else 'refused'}; "
        f"{'at most ' + str(m.max_per_hour) + ' per hour' if m.max_per_hour else 'no rate limit'}; "
        f"windows {_list(m.windows) if m.windows else 'any time'}; "
        f"destinations {', '.join(where)}; {near}; attestation {policy.attestation.profile}{signed}"
    )


def summarize_host_policy(policy: HostPolicy) -> str:
    """One-line restatement of a host policy."""
    labels, accept = policy.labels, policy.accept
    sources = "any enrolled host" if "*" in accept.sources else _list(accept.sources)
    return (
        f"host policy for {policy.host} (country {labels.country}, zone {labels.zone or '-'}, "
        f"security level {labels.security_level}): accepts VMs from {sources} of tenants "
        f"{_list(accept.tenants)}; signed VM policy "
        f"{'required' if accept.require_signed_vm_policy else 'not required'}"
    )


def _kind_of(text: str, fmt: PolicyFormat) -> str:
    """Tell a VM policy from a host policy by its top-level key (``vm`` or ``host``)."""
    try:
        data: Any = tomllib.loads(text) if fmt == "toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError):
        return "vm"  # let the full parser report the syntax error with its line
    if isinstance(data, dict) and "host" in data and "vm" not in data:
        return "host"
    return "vm"


def check_policy_file(path: Path | str, verify_signer: Callable[[bytes], Any] | None = None) -> str:
    """Validate a VM policy, host policy or signed VM policy (``.json``) and summarise it.

    Raises ``PolicyError`` with file, line and reason when the file is malformed. A signed policy
    is only checked for its signature when ``verify_signer`` is given; the summary says so.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(
                f"{path}: cannot read signed policy ({exc}); check the path"
            ) from None
        signed = SignedPolicy.from_json(raw)
        if verify_signer is not None:
            return f"{path}: " + summarize_vm_policy(verify_signed_policy(signed, verify_signer))
        fmt = as_format(signed.fmt, str(path))
        policy = parse_vm_policy(signed.policy_text, source=str(path), fmt=fmt)
        return (
            f"{path}: {summarize_vm_policy(policy)}; signed by {signed.signer} "
            "(signature not checked: no trust bundle given)"
        )
    text, fmt = read_policy_text(path)
    if _kind_of(text, fmt) == "host":
        host = parse_host_policy(text, source=str(path), fmt=fmt)
        return f"{path}: " + summarize_host_policy(host)
    return f"{path}: " + summarize_vm_policy(parse_vm_policy(text, source=str(path), fmt=fmt))
