"""Human output of the migration benchmark: a progress bar while it runs, a table at the end.

Kept apart from the measuring code so that ``--json`` runs and tests never touch the terminal.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

#: (column title, metric key, format) in the order the table shows them.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("MB/s", "throughput_mbps", "{:.0f}"),
    ("total ms", "total_ms", "{:.0f}"),
    ("downtime ms", "downtime_ms", "{:.0f}"),
    ("felt gap ms", "heartbeat_gap_ms", "{:.0f}"),
    ("CPU s/GiB src", "cpu_s_per_gib_source", "{:.2f}"),
    ("CPU s/GiB dst", "cpu_s_per_gib_destination", "{:.2f}"),
    ("handshake ms", "handshake_ms", "{:.1f}"),
    ("first byte ms", "time_to_first_byte_ms", "{:.0f}"),
)


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def results_table(report: dict[str, Any]) -> Table:
    """Medians per dirty rate and channel (post-copy rows when measured), then the ratios."""
    t = Table(title="trustmig bench migrate (medians)")
    t.add_column("dirty MiB/s")
    t.add_column("channel")
    t.add_column("mode")
    t.add_column("ok")
    for title, _, _ in COLUMNS:
        t.add_column(title, justify="right")
    for rate, chans in report["by_dirty_rate"].items():
        for ch, entry in chans.items():
            rows = [("precopy", entry)]
            if isinstance(entry.get("postcopy"), dict):
                rows.append(("postcopy", entry["postcopy"]))
            for mode, e in rows:
                ok = f"{e['completed']}/{e['runs']}" + ("" if e["integrity_ok"] else " !mem")
                cells = [_fmt(e.get(key), fmt) for _, key, fmt in COLUMNS]
                t.add_row(rate, ch, mode, ok, *cells)
    ratios = report.get("ratios_by_dirty_rate") or {"": report.get("ratios", {})}
    text = "; ".join(
        f"dirty {rate}: " + ", ".join(f"{k} = {v:.2f}" for k, v in r.items())
        for rate, r in ratios.items()
        if r
    )
    t.caption = f"ratios: {text}" if text else "no ratio (channel missing)"
    cipher = report.get("cipher")
    if cipher:
        kib, cost = cipher["record_bytes"] // 1024, cipher["both_sides_cpu_s_per_gib"]
        t.caption += f"\ncipher alone ({cipher['cipher']}, {kib} KiB records): {cost:.2f} CPU s/GiB"
    return t


class BenchProgress:
    """A rich progress bar over the planned runs, on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled and sys.stderr.isatty()
        self.progress: Progress | None = None
        self.task: Any = None

    def __enter__(self) -> BenchProgress:
        if self.enabled:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress.stop()

    def update(self, done: int, total: int, label: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, total=total, description=label)

    def run_done(self, rec: dict[str, Any]) -> None:
        """One line per failed run, so failures are visible before the table."""
        if rec.get("status") != "completed":
            line = f"[yellow]run failed[/] {rec['channel']}: {rec.get('error')}"
            if self.progress is not None:
                self.progress.console.print(line)
            elif self.enabled:
                self.console.print(line)
