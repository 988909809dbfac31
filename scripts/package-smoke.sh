#!/usr/bin/env bash
# make package-smoke: installs the tarball `make package` made into the PostgreSQL it was built
# for — after removing every pg_keel file an earlier install left there, so that only the
# artifact's files are used — then runs the demo walk-through (scripts/demo.sh: a fresh data
# directory, CREATE EXTENSION, every capability once) against it.
# Usage: package-smoke.sh TARBALL PG_CONFIG VERSION
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tarball=$1
pg_config=$2
version=$3

libdir=$("$pg_config" --pkglibdir)
extdir=$("$pg_config" --sharedir)/extension
listing=$(tar -tzf "$tarball")
for f in "$libdir/pg_keel.so" "$extdir/pg_keel.control" "$extdir/pg_keel--$version.sql" \
         "$extdir/pg_keel--0.1.0--$version.sql"; do
  if ! grep -qxF ".$f" <<<"$listing"; then
    echo "package-smoke: $tarball lacks $f; it holds:" >&2
    echo "$listing" >&2
    exit 1
  fi
done

rm -f "$libdir/pg_keel.so" "$extdir/pg_keel.control" "$extdir"/pg_keel--*.sql
tar -C / --no-same-owner -xzf "$tarball"
echo "package-smoke: installed $(basename "$tarball"); the demo runs on a fresh data directory"
PG_CONFIG=$pg_config bash "$here/demo.sh"
echo "package-smoke: ok"
