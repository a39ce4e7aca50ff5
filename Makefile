# Everything but lint and unit needs root: Docker Engine and CRIU do.
PY := .venv/bin/python
# pytest exits 5 when it selects nothing: PYTEST_ARGS named tests of the other kind only.
NONE_SELECTED_OK := || [ $$? -eq 5 ]

.PHONY: host host-base venv lint unit demo test bench soak docs

## host: install and start what Dolly needs (Docker Engine, CRIU 4.2, pycriu, images); idempotent
host:
	@scripts/host.sh

# The host without the database images (scripts/images.sh): all the demo and the benchmark use.
host-base:
	@DOLLY_IMAGES=base scripts/host.sh

## demo: start a warm Python HTTP service, checkpoint it, clone it into 3 replicas
# (its host: no database images, and Dolly without the test extra in the venv)
demo:
	@DOLLY_IMAGES=base DOLLY_VENV=plain scripts/host.sh
	@$(PY) -m dolly.demo

## venv: only checks that the project's virtual environment exists (`make host` makes it)
venv:
	@test -x $(PY) || { echo "make: $(PY) is missing: run \`make host\` (as root) once to make it" >&2; exit 1; }

## lint: ruff, mypy and the import layers (import-linter), as configured in pyproject.toml; no root, no engine
lint: venv
	$(PY) -m ruff check dolly tests benchmarks examples
	$(PY) -m mypy
	.venv/bin/lint-imports

## unit: the tests that need no engine (pure logic, formats, policies): seconds, no root
unit: venv
	$(PY) -m pytest -m "not engine" -q $(PYTEST_ARGS) $(NONE_SELECTED_OK)

## docs: the site (mkdocs.yml, docs/) into build/site, --strict (a broken link or anchor fails); its examples: tests/test_docs.py
docs: venv
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

## test: lint, the unit tests, the docs, then the tests against the real engine and CRIU (marked engine)
test: host lint unit docs
	$(PY) -m pytest -m engine $(PYTEST_ARGS) $(NONE_SELECTED_OK)

## bench: Dolly against Podman, then density (benchmarks/README.md); BENCH_ARGS to narrow it
bench: host-base
	@scripts/bench-setup.sh
	@$(PY) benchmarks/bench.py $(BENCH_ARGS)

## soak: the long runs: 500 checkpoint/clone/remove cycles and 5,000 fuzzed inputs per fuzz test
soak: host
	DOLLY_SOAK_CYCLES=500 DOLLY_SOAK_REPORT=benchmarks/results/soak.json DOLLY_FUZZ_EXAMPLES=5000 \
		$(PY) -m pytest tests/test_soak.py tests/test_fuzz.py $(PYTEST_ARGS)
