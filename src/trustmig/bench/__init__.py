"""Benchmarks of live migration: trustmig's secure channel next to QEMU's plain and TLS paths."""

from trustmig.bench.config import CHANNELS, BenchConfig, parse_channels, parse_dirty_rates
from trustmig.bench.errors import BenchConfigError, BenchError
from trustmig.bench.migrate import plan_runs, run_migrate_bench

__all__ = [
    "CHANNELS",
    "BenchConfig",
    "BenchConfigError",
    "BenchError",
    "parse_channels",
    "parse_dirty_rates",
    "plan_runs",
    "run_migrate_bench",
]
