# pg_keel — every target works from a fresh Debian 12 machine as root (or with sudo) and
# installs what is missing first (idempotently).
#
# PG selects the PostgreSQL major version for every target (15, 17 or 18; default 15):
#   make test PG=18
# 15 is Debian 12's own binary package; 17 and 18 are built from Debian's source packages into
# a cache outside the clone by scripts/pg-from-source.sh on first use (a few minutes, once).

PG           ?= 15
SUPPORTED_PG := 15 17 18
ifeq ($(filter $(PG),$(SUPPORTED_PG)),)
$(error PG=$(PG) is not supported; use one of $(SUPPORTED_PG))
endif
# The pg_config of that version, as a shell expression (the source build runs inside a recipe,
# never when make reads this file).
PG_CONFIG    ?= $(if $(filter 15,$(PG)),/usr/lib/postgresql/15/bin/pg_config,$$(bash scripts/pg-from-source.sh $(PG)))
PGRX_VERSION := 0.18.0
APT_PACKAGES := postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang \
                build-essential pkg-config sudo redis-server redis-tools openssl ca-certificates curl \
                pgbouncer
SUDO         := $(if $(filter 0,$(shell id -u)),,sudo)
PGRX_DATA    := target/pgrx-test-data-$(PG)
EXAMPLES_VENV := target/examples/venv
VERSION      := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -1)
PACKAGE      := target/pg_keel-$(VERSION)-pg$(PG)-$(shell dpkg --print-architecture 2>/dev/null || uname -m).tar.gz
# Cargo features for the extension crate at this version.
PG_FEATURES  := --no-default-features --features pg$(PG)

.PHONY: deps pg install demo test test-all unit client-test examples-deps lint bench bench-long package package-smoke typecheck released-scripts clean

## deps: apt packages, cargo-pgrx $(PGRX_VERSION), PostgreSQL $(PG) (a source build for 17 and
## 18), and pgrx pointed at its pg_config.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@if [ "$$(cargo pgrx --version 2>/dev/null)" != "cargo-pgrx $(PGRX_VERSION)" ]; then \
	  cargo install cargo-pgrx --version $(PGRX_VERSION) --locked; \
	fi
	@pgc=$(PG_CONFIG) || exit 1; \
	grep -qsx "pg$(PG) = \"$$pgc\"" $${PGRX_HOME:-$$HOME/.pgrx}/config.toml || cargo pgrx init --pg$(PG) $$pgc

## pg: print the pg_config of PostgreSQL $(PG) (building it first for 17 and 18).
pg:
	@pgc=$(PG_CONFIG) && echo $$pgc

## install: build (release) and install into the local PostgreSQL $(PG).
install: deps
	cargo pgrx install --release --pg-config $(PG_CONFIG) $(if $(SUDO),--sudo,)

## demo: install, then a walk-through on a throwaway cluster and redis-server.
demo: install
	PG_CONFIG=$(PG_CONFIG) bash scripts/demo.sh

## test: the whole suite on PostgreSQL $(PG) — unit and #[pg_test] (pgrx's cluster), then the
## client-side tests in pg_test/ against a cluster of their own with the library preloaded.
test: released-scripts unit client-test

## test-all: lint and the whole suite on every supported version, one after another.
test-all:
	@for v in $(SUPPORTED_PG); do $(MAKE) --no-print-directory lint test PG=$$v || exit 1; done

unit: deps
	$(SUDO) install -d -o postgres -g postgres $(PGRX_DATA)
	CARGO_PGRX_TEST_PGDATA=$(CURDIR)/$(PGRX_DATA) cargo pgrx test pg$(PG)

client-test: install examples-deps
	KEEL_PG_CONFIG=$(PG_CONFIG) cargo test -p keel-pg-test --tests --no-fail-fast

## examples-deps: what the example programs in examples/ need, each pinned by its lock file — a
## Python venv (examples/python/requirements.txt), examples/node/node_modules
## (package-lock.json, `npm ci`), the Rust example's binary — and Node.js and Python's venv from
## apt where the machine has none.
examples-deps: deps
	@if ! command -v node >/dev/null || ! command -v npm >/dev/null; then \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm; \
	fi
	@if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv; \
	fi
	@if [ ! -f $(EXAMPLES_VENV)/.installed ] || [ examples/python/requirements.txt -nt $(EXAMPLES_VENV)/.installed ]; then \
	  rm -rf $(EXAMPLES_VENV) && python3 -m venv $(EXAMPLES_VENV) && \
	  $(EXAMPLES_VENV)/bin/pip install -q --disable-pip-version-check -r examples/python/requirements.txt && \
	  touch $(EXAMPLES_VENV)/.installed; \
	fi
	@if [ ! -f examples/node/node_modules/.package-lock.json ] || [ examples/node/package-lock.json -nt examples/node/node_modules/.package-lock.json ]; then \
	  cd examples/node && npm ci --no-audit --no-fund --loglevel=error; \
	fi
	cargo build -p keel-worker-example --bin keel-worker

lint: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets $(PG_FEATURES) -- -D warnings
	cargo clippy -p pg_keel --all-targets $(PG_FEATURES) --features pg_test -- -D warnings

## package: an installable artifact for PostgreSQL $(PG): `cargo pgrx package`'s tree as
## target/pg_keel-<version>-pg$(PG)-<arch>.tar.gz, paths as that pg_config reports them
## (install with `tar -C / -xzf`, then restart PostgreSQL and ALTER EXTENSION pg_keel UPDATE).
package: deps
	cargo pgrx package --pg-config $(PG_CONFIG)
	tar -C target/release/pg_keel-pg$(PG) --owner=0 --group=0 --sort=name \
	  -czf $(PACKAGE) .
	@echo "package: $(PACKAGE)"

## package-smoke: install that artifact alone (earlier pg_keel files removed first) and run the
## demo on a fresh data directory against it.
package-smoke: package
	$(SUDO) bash scripts/package-smoke.sh $(PACKAGE) $(PG_CONFIG) $(VERSION)

## typecheck: type-check the extension against PostgreSQL $(PG)'s headers as pgrx ships them
## (its bundled bindings), without that PostgreSQL installed: what CI runs for a version whose
## source the package registry does not serve. It proves the code builds, not that it works.
typecheck:
	DOCS_RS=1 __CARGO_TEST_CHANNEL_OVERRIDE_DO_NOT_USE_THIS=nightly \
	CARGO_TARGET_DIR=target/typecheck-pg$(PG) \
	cargo -Z profile-rustflags check --lib $(PG_FEATURES) \
	  --config 'profile.dev.package.pgrx-pg-sys.rustflags=["--cfg","docsrs"]'

## released-scripts: the install and upgrade scripts of released versions are never edited.
## sql/released/SHA256SUMS pins each (paths relative to sql/released: the install scripts kept
## there, and from its release on each upgrade script in sql/ as ../pg_keel--A--B.sql); a file
## that differs from its checksum, or whose git history shows a change after it was added,
## fails the check.
released-scripts:
	cd sql/released && sha256sum --quiet --strict -c SHA256SUMS
	@for f in sql/released/*.sql; do \
	  grep -q " $$(basename $$f)\$$" sql/released/SHA256SUMS || { echo "$$f is not in sql/released/SHA256SUMS"; exit 1; }; \
	done
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  for f in $$(awk '{ print $$2 }' sql/released/SHA256SUMS); do \
	    changed=$$(git log --format='%h %s' --diff-filter=MDR -- "sql/released/$$f"); \
	    if [ -n "$$changed" ]; then \
	      echo "released-scripts: $$f was changed after its release:"; echo "$$changed"; exit 1; \
	    fi; \
	  done; \
	fi

## bench: pg_keel beside the plain-SQL way and Redis, on this machine, in one run.
bench: install
	KEEL_PG_CONFIG=$(PG_CONFIG) KEEL_BENCH_PGMQ_SQL="$$(bash scripts/fetch-pgmq.sh || echo '')" cargo run --release -p keel-bench

## bench-long: the steady-state peaks, then overload (1.5x for a minute, then 60 %) and a
## KEEL_BENCH_LONG_MINUTES (default 10) load at 60 % with the xmin horizon pinned, per step.
bench-long: install
	KEEL_PG_CONFIG=$(PG_CONFIG) KEEL_BENCH_ONLY=long KEEL_BENCH_PGMQ_SQL="$$(bash scripts/fetch-pgmq.sh || echo '')" cargo run --release -p keel-bench

clean:
	cargo clean
