# Two entry points for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test check install install-test ensure-redis ensure-cc bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'

## Serve examples/echo.py on 127.0.0.1:8081 with in-memory stores.
run: install
	$(BIN)/python -m asyncapy run examples.echo:app --host 127.0.0.1 --port 8081

## The integration tests start real parts on free loopback ports: redis-server (also as
## Sentinel: `redis-server --sentinel`, and as Cluster nodes), redis-cli (creates the
## Cluster) and haproxy (in front of the servers, with PROXY headers).
ensure-redis:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null 2>&1 || missing="$$missing redis-tools"; \
	{ command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; } || missing="$$missing haproxy"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing$$missing (Debian packages) for the integration tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "Missing for the integration tests:$$missing; install them (Debian/Ubuntu: sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

## Run the whole test suite.
test: install-test ensure-redis ensure-cc
	$(BIN)/python -m pytest

## Type-check and lint: mypy (strict, [tool.mypy] in pyproject.toml) on the package as it
## installs, and ruff ([tool.ruff]) on the whole repository. mypy maps module names to
## folders, so build/typecheck gives domain/ and adapters/ their installed names
## (asyncapy.domain, asyncapy.adapters) with links to the repository's files.
TYPECHECK := build/typecheck
check: install-test $(BIN)/ruff
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/asyncapy
	for f in asyncapy/*; do ln -s ../../../$$f $(TYPECHECK)/asyncapy/; done
	ln -s ../../../domain $(TYPECHECK)/asyncapy/domain
	ln -s ../../../adapters $(TYPECHECK)/asyncapy/adapters
	cd $(TYPECHECK) && ../../$(BIN)/python -m mypy --config-file ../../pyproject.toml -p asyncapy
	$(BIN)/python -m ruff check .

$(BIN)/ruff: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,check]'

## Build the documentation site into site/ (MkDocs, offline); any warning fails it.
docs: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	$(BIN)/python -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build site *.egg-info

## benchmarks.run drives the servers with benchmarks/fastload.c (compiled on first use):
## the Python load generator caps at its own ~60k req/s on 2 cores. Without a C compiler
## (and no root to install gcc) it falls back to the Python one and says so.
ensure-cc:
	@if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1 && ! command -v clang >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing gcc (Debian package) for the benchmarks' load generator"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null; } \
	      || echo "Could not install gcc: the benchmarks use the slower Python load generator"; \
	  else \
	    echo "No C compiler: the benchmarks use the slower Python load generator (Debian/Ubuntu: sudo apt-get install gcc)"; \
	  fi; \
	fi

## Benchmarks (run by hand): AsyncAPY against bare trio in the same run, codecs,
## idle-session memory, and the cost of admission with Redis.
bench: $(BIN)/python ensure-redis ensure-cc
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks.run --rounds 7 --seconds 2 --uvloop --codec --churn --plot docs/performance.png
	$(BIN)/python -m benchmarks.codecs
	$(BIN)/python -m benchmarks.idle_memory
	$(BIN)/python -m benchmarks.admission
	$(BIN)/python -m benchmarks.ratelimit

## Fuzz the protocol core (framing, Connection, both codecs; then the PROXY header parser;
## pure code, no sockets) with FUZZ_RUNS inputs each; exits non-zero on a finding (saved
## under fuzz/findings/). Not part of `make test`; docs/security.md records the runs.
FUZZ_RUNS ?= 100000
FUZZ_SEED ?= 1
.PHONY: fuzz
fuzz: install
	$(BIN)/python -m fuzz --runs $(FUZZ_RUNS) --seed $(FUZZ_SEED)
	$(BIN)/python -m fuzz --target proxy --runs $(FUZZ_RUNS) --seed $(FUZZ_SEED)
