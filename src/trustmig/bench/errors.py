"""Errors of the migration benchmark.

Every failure a user can cause (a bad option) or meet (a run that did not complete) surfaces as
one line that names what went wrong and what to do about it.
"""

from __future__ import annotations


class BenchError(Exception):
    """The benchmark could not run or a run failed; the message is one actionable line."""


class BenchConfigError(BenchError):
    """A benchmark option is invalid; the message names the option and the accepted values."""
