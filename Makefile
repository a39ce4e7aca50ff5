# Everything needs root: Docker Engine and CRIU do.
PY := .venv/bin/python

.PHONY: host demo test bench soak

## host: install and start what Dolly needs (Docker Engine, CRIU 4.2, pycriu, images); idempotent
host:
	@scripts/host.sh

## demo: start a warm Python HTTP service, checkpoint it, clone it into 3 replicas
demo: host
	@$(PY) -m dolly.demo

## test: the whole test suite against the real engine and CRIU
test: host
	$(PY) -m pytest $(PYTEST_ARGS)

## bench: Dolly against Podman and Docker by hand (benchmarks/README.md); BENCH_ARGS to narrow it
bench: host
	@scripts/bench-setup.sh
	@$(PY) benchmarks/bench.py $(BENCH_ARGS)

## soak: the long runs: 500 checkpoint/clone/remove cycles and 5,000 fuzzed inputs per fuzz test
soak: host
	DOLLY_SOAK_CYCLES=500 DOLLY_SOAK_REPORT=benchmarks/results/soak.json DOLLY_FUZZ_EXAMPLES=5000 \
		$(PY) -m pytest tests/test_soak.py tests/test_fuzz.py $(PYTEST_ARGS)
