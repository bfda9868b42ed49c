"""Machine-readable codes of control API errors.

Every error answer carries a ``code`` next to its one-line ``error``. Decisions that matter for
safety (may the source resume its guest?) read the code, never the message text.
"""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    REFUSED = "refused"  # a decision said no (policy, guard, admission, quarantine)
    DENIED = "denied"  # the caller lacks the role or tenant for this operation
    NOT_FOUND = "not_found"  # no such VM or migration here
    INVALID = "invalid"  # the request is malformed or not possible in this state
    BUSY = "busy"  # the VM is taken by another operation
    ABORTED = "aborted"  # the migration was aborted here: its guest does not run
    COMMITTED = "committed"  # the migration was committed here: its guest runs
    IN_DOUBT = "in_doubt"  # the outcome is not known (yet); nothing was undone
    FAILED = "failed"  # the operation failed (QEMU, disk...)
    TRANSPORT = "transport"  # the agent could not be reached or the connection broke
    TIMEOUT = "timeout"  # no answer in time (the request may still have been carried out)
    INTERNAL = "internal"  # a bug; the message names the exception


class RequestError(Exception):
    """A request was refused or failed; ``message`` is the one line the caller sees."""

    def __init__(self, message: str, code: Code | str = Code.REFUSED) -> None:
        super().__init__(message)
        self.code = Code(code)
