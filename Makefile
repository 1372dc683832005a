# modsec-spoa: the commands a newcomer needs.
#   make up      the whole stack in the foreground (HAProxy :8080)
#   make up-envoy   the same pool behind Envoy with ext_proc (:10000); ENVOY_FILTER=ext_authz for the other filter
#   make test    unit + end-to-end tests (real HAProxy, gRPC, libmodsecurity, CRS)
#   make test-compose   docker-compose.yml on a real Docker engine (as root; ~1.5 min, ~4 on a clean machine)
#   make bench   modsec-spoa vs the raw engine, HAProxy alone and nginx + ModSecurity
#   make conformance   the OWASP CRS regression suite (CRS_DIR, CRS_TESTS)
PY := .venv/bin/python
CRS_DIR ?= $(firstword $(wildcard ../shared/crs/v4.28.0) /usr/share/modsecurity-crs)
CRS_TESTS ?= $(CRS_DIR)/tests
export PYTHONPATH := $(CURDIR)

.PHONY: install up up-envoy test test-unit test-e2e test-compose haproxy32 proto proto-check conformance bench clean fuzz soak

install:
	@bash scripts/install.sh

haproxy32:
	@bash scripts/fetch-haproxy32.sh

up: install
	$(PY) -m stack

up-envoy: install
	$(PY) -m stack.envoy

test: install
	$(PY) -m wafapi.codegen --check
	$(PY) -m pytest -q tests --ignore=tests/compose

# Starts Debian's dockerd when no engine runs (and stops it after), builds
# local stand-ins for base images it cannot pull, then runs the real
# docker-compose.yml with 3 wafsvc replicas through faults (README, Docker
# Compose). Measurements: run/compose/report.json.
test-compose:
	@bash scripts/install.sh compose
	RUN_COMPOSE_TEST=1 $(PY) -m pytest -q tests/compose

test-unit: install
	$(PY) -m pytest -q tests/unit

test-e2e: install
	$(PY) -m pytest -q tests/e2e

# Socket-level SPOP fuzzing of a real gateway (make test runs 3 s of it).
FUZZ_SECONDS ?= 300
fuzz: install
	$(PY) -m fuzz.spop_fuzz --seconds $(FUZZ_SECONDS)

# 100k mixed requests through the whole stack; RSS of every process before and after.
SOAK_REQUESTS ?= 100000
soak: install
	$(PY) -m tools.soak --requests $(SOAK_REQUESTS)

proto: install
	$(PY) -m wafapi.codegen

# The OWASP CRS regression suite through the whole stack and in-process;
# the last line is the full-stack count. Report: conformance/report.json.
conformance: install
	$(PY) -m conformance --crs-dir $(CRS_DIR) --tests $(CRS_TESTS) $(CONFORMANCE_ARGS)

proto-check: install
	$(PY) -m wafapi.codegen --check

bench:
	@bash scripts/install.sh bench
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf .venv .tools run .pytest_cache .hypothesis
