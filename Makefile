.PHONY: bootstrap demo test test-fast lint typecheck bench lab clean

bootstrap:
	@scripts/bootstrap

demo: bootstrap
	.venv/bin/trustmig demo

test: bootstrap
	.venv/bin/trustmig image build
	.venv/bin/trustmig image build --os debian-12
	.venv/bin/pytest -q -p no:cacheprovider --durations=40 tests

test-fast: bootstrap
	.venv/bin/pytest -q -m "not vm" tests

lint: bootstrap
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks

typecheck: bootstrap
	.venv/bin/mypy

bench: bootstrap
	.venv/bin/trustmig bench migrate --channel plain,secure,qemu-tls

lab: bootstrap
	.venv/bin/trustmig lab run --report lab-report.html

clean:
	rm -rf .venv build *.egg-info
