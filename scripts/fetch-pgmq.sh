#!/usr/bin/env bash
# pgmq's SQL-only install script, for `make bench` to run pgmq beside pg_keel: pgmq 1.11.1 as
# embedded in the `pgmq` crate 0.33.5 on crates.io (a package registry, reachable where GitHub
# is not). Downloaded once into a cache outside the clone, checksum-verified; prints the path.
set -euo pipefail
version=0.33.5
sha256=3f58f55237b929db4bc411bb4016655a5a16cc33172f37dd70a1b887da8c346a
cache="${XDG_CACHE_HOME:-$HOME/.cache}/pg_keel/pgmq-crate-$version"
sql="$cache/pgmq.sql"
if [ ! -s "$sql" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  curl -sSfL --retry 3 -o "$tmp/pgmq.crate" "https://static.crates.io/crates/pgmq/pgmq-$version.crate"
  echo "$sha256  $tmp/pgmq.crate" | sha256sum -c --quiet - >&2
  tar -xzf "$tmp/pgmq.crate" -C "$tmp" "pgmq-$version/src/install/embedded/sql/pgmq.sql"
  mv "$tmp/pgmq-$version/src/install/embedded/sql/pgmq.sql" "$sql.tmp"
  mv "$sql.tmp" "$sql"
fi
echo "$sql"
