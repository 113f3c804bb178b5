# The two commands of the README:
#   make run    create the virtual environment, install, start the all-in-one (foreground)
#   make test   install what the tests need and run them all
# Optional: make lint, make typecheck, make imports (the one-way import contract in
# .importlinter), make check (all four), make bench (MX benchmark),
# make bench-inbound (MX to Maildir), make bench-imap (IMAP benchmark),
# make bench-dkim (DKIM signing against dkimpy), make bench-outbound (relay to an MX).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SOURCES := $(shell find edge connector maildir webapi twistd-plugins -name '*.py' -o -name '*.mako') setup.cfg pyproject.toml
ARGS   ?=

.PHONY: run test lint typecheck imports check clean bench bench-imap bench-inbound bench-dkim \
	bench-outbound

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python $(SOURCES)
	$(BIN)/pip install -q '.[test]'
	@touch $@

run: $(VENV)/.installed
	$(BIN)/twistd -n --pidfile= tailpost $(ARGS)

test: $(VENV)/.installed
	scripts/install-test-deps
	$(BIN)/pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy edge connector maildir webapi twistd-plugins/twisted/plugins tests

# The import contract (.importlinter): imports go one way, from the assembly down to maildir.
imports: $(VENV)/.installed
	$(BIN)/lint-imports

check: lint typecheck imports test

# The MX benchmark (bench/smtp_bench.py; results in docs/benchmarks.md). Not a test.
bench: $(VENV)/.installed
	scripts/install-test-deps
	PYTHONPATH=. $(BIN)/python bench/smtp_bench.py $(ARGS)

# Inbound end to end in the all-in-one, MX to Maildir, next to two sinks (bench/inbound_bench.py).
bench-inbound: $(VENV)/.installed
	scripts/install-test-deps
	PYTHONPATH=. $(BIN)/python bench/inbound_bench.py $(ARGS)

# The IMAP benchmark against Dovecot on one large folder (bench/imap_bench.py). Not a test.
bench-imap: $(VENV)/.installed
	scripts/install-bench-deps
	PYTHONPATH=. $(BIN)/python bench/imap_bench.py $(ARGS)

# DKIM signing of outbound mail next to dkimpy's dkim.sign, one core (bench/dkim_bench.py).
bench-dkim: $(VENV)/.installed
	PYTHONPATH=. $(BIN)/python bench/dkim_bench.py $(ARGS)

# Outbound end to end: the edge's relay, DKIM signing, queue, to an MX (smtp-sink), next to a
# private Postfix relaying the same load (bench/outbound_bench.py). Not a test.
bench-outbound: $(VENV)/.installed
	scripts/install-test-deps
	PYTHONPATH=. $(BIN)/python bench/outbound_bench.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
