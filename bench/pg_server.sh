# Sourced by bench/postgres.sh and bench/compare.sh: a throwaway PostgreSQL
# (initdb into a temporary folder, stock durable settings: fsync and
# synchronous_commit on, pg_stat_statements loaded) on a free loopback
# port, and one `taskq serve --store postgres://...` on it, both stopped
# and removed on exit.
#
#   pg_server_start TASKQ_BINARY
#
# sets: pg_dir, pg_port, pg_url, pg_grpc (the taskq server's port);
# defines psql().
# Runs as root (PostgreSQL then runs as the `postgres` user) or as any user
# that may run initdb.

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)

# Whether PostgreSQL's server binaries are here.
pg_available() { [ -n "$pg_bin" ] && [ -x "$pg_bin/initdb" ]; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pg_server_stop() {
  [ -n "${pg_server_pid:-}" ] && kill "$pg_server_pid" 2>/dev/null || true
  if [ -n "${pg_dir:-}" ]; then
    "${pg_as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$pg_dir"
  fi
}

pg_server_start() {
  local taskq=$1
  pg_dir=$(mktemp -d /tmp/taskq-bench-pg.XXXXXX)
  pg_as=()
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$pg_dir"
    pg_as=(runuser -u postgres --)
  fi
  pg_port=$(free_port)
  "${pg_as[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U postgres >/dev/null
  "${pg_as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w \
    -o "-c listen_addresses=127.0.0.1 -c port=$pg_port -k $pg_dir -c shared_preload_libraries=pg_stat_statements -c max_connections=200" \
    start >/dev/null
  psql() { "${pg_as[@]}" "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -Atq -c "$1"; }
  psql "CREATE EXTENSION pg_stat_statements" >/dev/null
  pg_url="postgres://postgres@127.0.0.1:$pg_port/postgres"
  "$taskq" migrate --store "$pg_url" >/dev/null
  pg_grpc=$(free_port)
  "$taskq" serve --listen "127.0.0.1:$pg_grpc" --http-listen off --store "$pg_url" > "$pg_dir/serve.log" 2>&1 &
  pg_server_pid=$!
  for _ in $(seq 100); do grep -q "taskq serving" "$pg_dir/serve.log" && break; sleep 0.1; done
  grep -q "taskq serving" "$pg_dir/serve.log" || { cat "$pg_dir/serve.log" >&2; return 1; }
}
