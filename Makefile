# Two commands matter: `make demo` and `make test`. Both create (or refresh) .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-network test test-system soak test-faults lint typecheck unit bench venv clean \
	browser console-screenshots

$(STAMP): pyproject.toml setup.py $(wildcard qkdnode/native/*.pyx qkdnode/native/*.pxd qkdnode/native/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/qkdnode demo

# Five sites relaying keys end to end (docs/network.md); network namespaces when run as
# root, loopback otherwise.
demo-network: $(STAMP)
	$(BIN)/qkdnode demo --network configs/network.toml

test: $(STAMP) lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q

# The multi-daemon scenarios (tests/system and tests marked `system`; ~45 min; not part
# of `make test`, see README).
test-system: $(STAMP) browser
	QKDNODE_SYSTEM_TESTS=1 $(BIN)/python -m pytest -q -m system tests

# Debian's chromium and chromedriver for the web console's browser tests, screenshots and
# page-load bench: installed with apt when missing and run as root; otherwise those tests
# are skipped and say why.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver >/dev/null; \
	else echo "chromium/chromedriver missing and not root: browser tests will be skipped"; fi

# The console's screenshots in docs/img, from the five-site network (a few minutes).
console-screenshots: $(STAMP) browser
	$(BIN)/python -m tests.console.screenshots docs/img

# A pair of daemons for SOAK_S seconds (default 1 h) with drift and a fault every
# SOAK_FAULT_S seconds; prints a JSON report (RSS, blocks, alarms, keys identical).
SOAK_S ?= 3600
SOAK_FAULT_S ?= 300
soak: $(STAMP)
	$(BIN)/python -m tests.soak.soak --duration $(SOAK_S) --fault-interval $(SOAK_FAULT_S)

# Fault campaign (not part of `make test`): a pair of daemons with ETSI 014 delivery takes
# FAULTS faults at random moments (schedule from FAULTS_SEED): kills, fiber cut, detector
# disconnect, frozen peer, disk write errors; checks recovery, key stores and deliveries.
# Report: table + JSON (last line), also in FAULTS_OUT/report.json (default: a temp dir).
FAULTS ?= 100
FAULTS_SEED ?= 1
FAULTS_OUT ?=
test-faults: $(STAMP)
	$(BIN)/python -m tests.faults.campaign --faults $(FAULTS) --seed $(FAULTS_SEED) \
		$(if $(FAULTS_OUT),--out $(FAULTS_OUT))

bench: $(STAMP)
	$(BIN)/qkdnode bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
