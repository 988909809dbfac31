#!/usr/bin/env bash
# make demo: a throwaway PostgreSQL cluster (15, or the version PG_CONFIG names; own data dir
# and port, pg_keel preloaded) and a throwaway redis-server; runs scripts/demo.sql with its
# output; stops both whatever happens.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bindir=$(${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config} --bindir)

free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  echo "no free port found" >&2; exit 1
}

as_pg() { if [ "$(id -u)" = 0 ]; then sudo -n -u postgres -- "$@"; else "$@"; fi; }

dir=$(mktemp -d /tmp/keel-demo.XXXXXX)
chmod 755 "$dir"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
pg_port=$(free_port)
redis_port=$(free_port)
redis_pid=""

cleanup() {
  as_pg "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
  rm -rf "$dir"
  echo "demo: stopped the cluster and redis-server, removed $dir"
}
trap cleanup EXIT

echo "demo: redis-server on port $redis_port, PostgreSQL $("$bindir/postgres" -V | awk "{print \$3}") on port $pg_port (data in $dir)"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
redis_pid=$!

as_pg "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
cat <<CONF | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
port = $pg_port
listen_addresses = ''
unix_socket_directories = '$dir'
shared_preload_libraries = 'pg_keel'
keel.database = 'demo'
keel.redis_url = 'redis://127.0.0.1:$redis_port/0'
CONF
as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
as_pg "$bindir/createdb" -h "$dir" -p "$pg_port" -U postgres demo

as_pg "$bindir/psql" -h "$dir" -p "$pg_port" -U postgres -d demo -X -v ON_ERROR_STOP=1 \
  --echo-queries -P pager=off -f - < "$here/demo.sql"
echo
echo "demo: what the Redis stream keel:orders holds (redis-cli XRANGE keel:orders - +):"
redis-cli -p "$redis_port" XRANGE keel:orders - +
echo "demo: done"
