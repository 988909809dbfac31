#!/usr/bin/env bash
# Builds PostgreSQL MAJOR (17 or 18) from the Debian source package and prints the path of its
# pg_config. Debian 12 serves PostgreSQL 15 as binaries only; 17 (suite trixie) and 18 (suite
# sid) come as source packages through deb-src lines in a private sources list, so the
# machine's own apt sources and package state are not touched and no binary from another suite
# is installed.
#
# Idempotent: the build lands in a cache outside the clone ($KEEL_PG_CACHE; default
# /var/cache/pg_keel as root, where the `postgres` user that runs test clusters can read it,
# else ~/.cache/pg_keel) and a second run reuses it. Checksum-verified: apt checks the downloaded
# files against the Sources index it verified with the Debian archive keyring, and this script
# checks the upstream tarball against the SHA-256 the signed .dsc gives before extracting it.
#
# Usage: scripts/pg-from-source.sh 17        # prints <cache>/pg17/bin/pg_config
# Progress goes to stderr; only the path goes to stdout. Exit status 3: the registry does not
# serve that source package (nothing was built); any other failure is 1.
set -euo pipefail

major=${1:?usage: $0 MAJOR (17 or 18)}
case "$major" in
  17) suite=trixie ;;
  18) suite=sid ;;
  *) echo "$0: PostgreSQL $major is not built from source here (15 comes from Debian's binaries)" >&2; exit 2 ;;
esac

if [ "$(id -u)" = 0 ]; then default_cache=/var/cache/pg_keel; else default_cache=${XDG_CACHE_HOME:-$HOME/.cache}/pg_keel; fi
cache=${KEEL_PG_CACHE:-$default_cache}
prefix=$cache/pg$major
# The contrib modules the tests and the bench use (amcheck: index checks in the rate-limit
# suite; pgstattuple: dead tuples in the bench). A cached build without one of them is redone.
contribs=(amcheck pgstattuple)
complete() {
  [ -x "$prefix/bin/pg_config" ] && [ -f "$prefix/.complete" ] || return 1
  local c
  for c in "${contribs[@]}"; do
    [ -f "$("$prefix/bin/pg_config" --sharedir)/extension/$c.control" ] || return 1
  done
}
if complete; then
  echo "$prefix/bin/pg_config"
  exit 0
fi

say() { echo "pg-from-source[$major]: $*" >&2; }
sudo=$([ "$(id -u)" = 0 ] || echo sudo)
started=$(date +%s)

# Build dependencies, from the machine's own suite.
need=()
for p in bison flex build-essential libreadline-dev zlib1g-dev libicu-dev libssl-dev pkg-config dpkg-dev ca-certificates; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  $sudo apt-get update -qq >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# The Debian mirror this machine already uses (no host is written into this repository).
mirror=$(
  { cat /etc/apt/sources.list 2>/dev/null; cat /etc/apt/sources.list.d/*.list 2>/dev/null; } |
    awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) { print $i; exit } }' || true
)
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }' || true)
fi
[ -n "$mirror" ] || { say "no Debian mirror found in the machine's apt sources"; exit 1; }

work=$cache/work-pg$major
rm -rf "$work"
mkdir -p "$work/apt/lists/partial" "$work/src"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb-src [signed-by=$keyring] $mirror $suite main" >"$work/apt/sources.list"
apt_private=(
  -o "Dir::Etc::sourcelist=$work/apt/sources.list"
  -o "Dir::Etc::sourceparts=-"
  -o "Dir::State::Lists=$work/apt/lists"
  -o "APT::Get::List-Cleanup=0"
  -o "APT::Sandbox::User=$(id -un)"
)
say "reading the $suite source index"
apt-get "${apt_private[@]}" -qq update >&2
say "downloading the source package postgresql-$major"
if ! (cd "$work/src" && apt-get "${apt_private[@]}" -qq --download-only source "postgresql-$major" >&2); then
  # Exit status 3 means "not served" (the index names the package, the pool does not give it),
  # which `.ci/run` tells apart from a failed build.
  say "the package registry does not serve the source of postgresql-$major ($suite) right now"
  rm -rf "$work"
  exit 3
fi

dsc=$(ls "$work/src"/postgresql-"$major"_*.dsc)
orig=$(ls "$work/src"/postgresql-"$major"_*.orig.tar.*)
want=$(awk -v f="$(basename "$orig")" '/^Checksums-Sha256:/ { on = 1; next } /^[^ ]/ { on = 0 } on && $3 == f { print $1 }' "$dsc")
have=$(sha256sum "$orig" | cut -d' ' -f1)
if [ -z "$want" ] || [ "$want" != "$have" ]; then
  say "checksum mismatch for $(basename "$orig"): .dsc says '${want}', file is '$have'"
  exit 1
fi
say "$(basename "$orig") sha256 $have matches the .dsc"

tar -xf "$orig" -C "$work/src"
srcdir=$(find "$work/src" -maxdepth 1 -type d -name "postgresql-$major*" | head -1)
cd "$srcdir"
say "configure and build (make -j$(nproc)) into $prefix"
./configure --prefix="$prefix" --with-openssl --without-llvm >"$work/configure.log" 2>&1 ||
  { tail -30 "$work/configure.log" >&2; exit 1; }
rm -rf "$prefix"
# Run from `make deps`, this script inherits MAKELEVEL, MAKEFLAGS and MFLAGS; PostgreSQL's
# build then believes it is a sub-make and skips generating its headers first (utils/errcodes.h
# missing on a machine without a cached build). Its own make is a top-level make.
unset MAKELEVEL MAKEFLAGS MFLAGS
(
  make -s -j"$(nproc)" &&
    make -s install &&
    for c in "${contribs[@]}"; do make -s -C "contrib/$c" install || exit 1; done
) >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; exit 1; }

version=$("$prefix/bin/pg_config" --version)
echo "$version $(basename "$orig") sha256:$have" >"$prefix/.complete"
rm -rf "$work"
say "$version built in $(( $(date +%s) - started )) s"
echo "$prefix/bin/pg_config"
