"""Errors of the cluster store: a code to match on and a one-line message naming what to do."""

from __future__ import annotations


class StoreError(Exception):
    """A store operation failed; ``code`` is one of ``unreachable``, ``conflict``, ``invalid``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StoreUnavailable(StoreError):
    """The store's database cannot be reached (the caller queues the write and carries on)."""

    def __init__(self, message: str) -> None:
        super().__init__("unreachable", message)


class OwnershipConflict(StoreError):
    """A VM's owner or epoch is not what the caller expected: someone else moved it first."""

    def __init__(self, vm: str, owner: str | None, epoch: int | None, message: str) -> None:
        super().__init__("conflict", message)
        self.vm = vm
        self.owner = owner
        self.epoch = epoch
