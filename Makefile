# geoclus: every target sets up what it needs on a fresh machine.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEBS    := libnbd-bin qemu-utils fio nbdkit fuse3 e2fsprogs mount util-linux postgresql nftables iproute2
DEBSTAMP := $(VENV)/.debs

.PHONY: all venv debs test lint demo bench crash sim clean

all: test

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests, demo and benchmark use (real NBD clients, fio, nbdkit).
# Installed with apt-get when running as root and any is missing.
$(DEBSTAMP): $(STAMP)
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	  else echo "warning: missing Debian packages:$$missing (not root, not installing)"; fi; \
	fi
	touch $(DEBSTAMP)

debs: $(DEBSTAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check geoclus replicator quorum bench tests
	$(VENV)/bin/ruff format --check geoclus replicator quorum bench tests
	$(VENV)/bin/mypy geoclus replicator quorum

test: $(STAMP) $(DEBSTAMP) lint
	$(VPY) -m pytest -q

demo: $(STAMP) $(DEBSTAMP)
	$(VENV)/bin/geoclus demo

# The long cluster simulation run (CI runs 120 seeds per quorum kind in `make test`).
sim: $(STAMP)
	$(VENV)/bin/geoclus sim --kind majority --seeds 2000 --duration 240
	$(VENV)/bin/geoclus sim --kind majority+witness --seeds 2000 --duration 240
	$(VENV)/bin/geoclus sim --kind disk --seeds 2000 --duration 240

bench: $(STAMP) $(DEBSTAMP)
	$(VPY) -m pip install -q -e '.[test,bench]'
	$(VPY) -m bench.replication
	$(VPY) -m bench.resync
	$(VPY) -m bench.nbd --plots bench/plots

# Crash-consistency campaign, SQLite and PostgreSQL (root, /dev/fuse, loop devices;
# about 25 minutes: 50 trials per database and mode plus the counter-experiments).
crash: $(STAMP) $(DEBSTAMP)
	$(VPY) -m bench.crash --trials 50

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
