# pg_keel — every target works from a fresh Debian 12 machine as root (or with sudo) and
# installs what is missing first (idempotently).

PG_CONFIG    ?= /usr/lib/postgresql/15/bin/pg_config
PGRX_VERSION := 0.18.0
APT_PACKAGES := postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang \
                build-essential pkg-config sudo redis-server redis-tools openssl ca-certificates curl
SUDO         := $(if $(filter 0,$(shell id -u)),,sudo)
PGRX_DATA    := target/pgrx-test-data

.PHONY: deps install demo test unit client-test lint bench bench-long clean

## deps: apt packages, cargo-pgrx $(PGRX_VERSION), and pgrx pointed at Debian's PostgreSQL 15.
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
	@grep -qs '^pg15' $${PGRX_HOME:-$$HOME/.pgrx}/config.toml || cargo pgrx init --pg15 $(PG_CONFIG)

## install: build (release) and install into the local PostgreSQL 15.
install: deps
	cargo pgrx install --release --pg-config $(PG_CONFIG) $(if $(SUDO),--sudo,)

## demo: install, then a walk-through on a throwaway cluster and redis-server.
demo: install
	bash scripts/demo.sh

## test: the whole suite — unit and #[pg_test] (pgrx's cluster), then the client-side tests in
## pg_test/ against a cluster of their own with the library preloaded.
test: unit client-test

unit: deps
	$(SUDO) install -d -o postgres -g postgres $(PGRX_DATA)
	cargo pgrx test pg15

client-test: install
	cargo test -p keel-pg-test --tests --no-fail-fast

lint: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --all-targets --features pg_test -- -D warnings

## bench: pg_keel beside the plain-SQL way and Redis, on this machine, in one run.
bench: install
	KEEL_BENCH_PGMQ_SQL="$$(bash scripts/fetch-pgmq.sh || echo '')" cargo run --release -p keel-bench

## bench-long: the steady-state peaks, then overload (1.5x for a minute, then 60 %) and a
## KEEL_BENCH_LONG_MINUTES (default 10) load at 60 % with the xmin horizon pinned, per step.
bench-long: install
	KEEL_BENCH_ONLY=long KEEL_BENCH_PGMQ_SQL="$$(bash scripts/fetch-pgmq.sh || echo '')" cargo run --release -p keel-bench

clean:
	cargo clean
