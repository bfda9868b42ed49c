"""Errors of the placement package: a code to match on and a one-line message to show."""

from __future__ import annotations


class PlacementError(Exception):
    """A planning request the view cannot answer (``code``: missing_host, unknown_host)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
