"""Live migration benchmark: plain QEMU TCP vs trustmig's secure channel vs QEMU TLS.

A thin wrapper over ``trustmig bench migrate`` (same options), for running from a checkout:

    .venv/bin/python benchmarks/migrate_bench.py --memory 1024 --dirty-rate 0,64 --repeat 3 \\
        --output bench.json

See docs/benchmarks.md for what each figure means and the numbers measured on the reference host.
"""

from __future__ import annotations

import sys

from trustmig.cli.main import app

if __name__ == "__main__":
    sys.exit(app(["bench", "migrate", *sys.argv[1:]]))
