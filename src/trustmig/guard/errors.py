"""Exceptions raised by the guard package.

Every error carries a one-line message that names the bad input and what to do about it, so
that the agent can log it or show it to an administrator unchanged.
"""

from __future__ import annotations


class GuardError(Exception):
    """Base class of every error raised by :mod:`trustmig.guard`."""


class InvalidRulesError(GuardError):
    """A guard rule or limit has a value that cannot be enforced."""


class UnknownConnectionError(GuardError):
    """A connection id was never issued by this guard (or has aged out of its history)."""


class AdmissionError(GuardError):
    """An admission request or ticket is malformed or unknown."""


class ClaimError(GuardError):
    """A resource claim is malformed or its signature does not verify."""


class QuarantineError(GuardError):
    """The quarantine file cannot be read or written, or a quarantine request is malformed."""
