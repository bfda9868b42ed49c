"""What both migration cores share: one place that changes a state, named timers, records.

A core holds a migration's state and nothing that does I/O. ``handle(event, now)`` and
``handle_timer(now)`` return the actions to carry out; ``get_timer()`` says when to call
``handle_timer`` next. ``_enter`` is the only code that assigns ``state``: it checks the
transition table, asks for the journal write first and writes the phase audit record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Generic, TypeVar

from trustmig.migration.actions import Action, Audit, Persist
from trustmig.migration.events import Event

S = TypeVar("S", bound=StrEnum)


class TransitionError(Exception):
    """A core was asked to move between two states its table does not connect (a bug)."""


@dataclass
class Timers:
    """Named deadlines (absolute times on the injected clock)."""

    deadlines: dict[str, float] = field(default_factory=dict)

    def set(self, name: str, at: float) -> None:
        self.deadlines[name] = at

    def cancel(self, *names: str) -> None:
        for n in names:
            self.deadlines.pop(n, None)

    def next(self) -> float | None:
        return min(self.deadlines.values(), default=None)

    def due(self, now: float) -> list[str]:
        """Names of the expired timers, earliest first; they are removed."""
        names = sorted((t, n) for n, t in self.deadlines.items() if t <= now)
        for _, n in names:
            del self.deadlines[n]
        return [n for _, n in names]


class MigrationCore(Generic[S]):
    """Base of the source and destination cores."""

    #: Allowed transitions: state -> states it may move to.
    TRANSITIONS: ClassVar[Mapping[Any, frozenset[Any]]]
    TERMINAL: ClassVar[frozenset[Any]]
    role: ClassVar[str]

    def __init__(self, migration_id: str, vm: str, peer: str, state: S, epoch: int) -> None:
        self.migration_id = migration_id
        self.vm = vm
        self.peer = peer
        self.state: S = state
        self.epoch = epoch
        self.error: str | None = None
        self.timers = Timers()
        self.history: list[tuple[float, str]] = []

    # ------------------------------------------------------------------ the one state change
    def _enter(self, new: S, now: float, reason: str = "", **data: Any) -> list[Action]:
        if new == self.state:
            return []
        if new not in self.TRANSITIONS.get(self.state, frozenset()):
            raise TransitionError(
                f"{self.role} migration {self.migration_id}: {self.state} -> {new} is not allowed"
            )
        old, self.state = self.state, new
        self.history.append((now, new.value))
        if new in self.TERMINAL:
            self.timers.deadlines.clear()
        info = {"from": old.value, "role": self.role, "peer": self.peer, **data}
        if reason:
            info["reason"] = reason
        return [Persist(), Audit("migration.phase", new.value, info)]

    # ------------------------------------------------------------------ driving
    def handlers(self) -> Mapping[type[Event], Callable[[Any, float], list[Action]]]:
        """Event class -> handler; events with no handler in a state are ignored."""
        raise NotImplementedError

    def handle(self, event: Event, now: float) -> list[Action]:
        """Feed one event; returns the actions to carry out, in order."""
        if self.state in self.TERMINAL and not self._terminal_accepts(event):
            return []
        handler = self.handlers().get(type(event))
        return handler(event, now) if handler is not None else []

    def _terminal_accepts(self, event: Event) -> bool:
        """Whether a terminal state still answers ``event`` (late requests get replies)."""
        return False

    def get_timer(self) -> float | None:
        return self.timers.next()

    def handle_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for name in self.timers.due(now):
            actions += self._on_timer(name, now)
        return actions

    def _on_timer(self, name: str, now: float) -> list[Action]:
        raise NotImplementedError

    # ------------------------------------------------------------------ journal
    @property
    def terminal(self) -> bool:
        return self.state in self.TERMINAL

    def record(self) -> dict[str, Any]:
        """What the journal keeps of the core (enough to restore it after a restart)."""
        return {
            "role": self.role,
            "migration_id": self.migration_id,
            "vm": self.vm,
            "peer": self.peer,
            "state": self.state.value,
            "epoch": self.epoch,
            "error": self.error,
            "extra": self._extra_record(),
        }

    def _extra_record(self) -> dict[str, Any]:
        return {}
