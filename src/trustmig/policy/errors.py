"""Exceptions raised by the policy package.

Every error carries a single line naming what was wrong and what to do, so that the CLI and the
agent can show it verbatim and the audit trail can record it without reformatting.
"""

from __future__ import annotations


class PolicyError(Exception):
    """A policy could not be read, validated, verified or applied.

    Malformed policies are rejected as a whole: no caller ever sees a partially applied policy.
    """


class PolicySignatureError(PolicyError):
    """A signed VM policy did not verify or was signed by someone not entitled to sign it."""


class PolicyStaleError(PolicyError):
    """A VM policy older than (or as old as) one this host already accepted: a rollback."""


class InvalidRequestError(PolicyError):
    """A migration request handed to the decision functions was itself malformed."""
