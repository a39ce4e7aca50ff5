# Everything needs root: Docker Engine and CRIU do.
PY := .venv/bin/python

.PHONY: host demo test clean-host

## host: install and start what Dolly needs (Docker Engine, CRIU 4.2, pycriu, images); idempotent
host:
	@scripts/host.sh

## demo: start a warm Python HTTP service, checkpoint it, clone it into 3 replicas
demo: host
	@$(PY) -m dolly.demo

## test: the whole test suite against the real engine and CRIU
test: host
	$(PY) -m pytest $(PYTEST_ARGS)
