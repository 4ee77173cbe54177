#!/bin/sh
# Starts PostgreSQL for taskq (see Dockerfile): makes the cluster in $PGDATA
# on first start with the role and database named by the URL in
# $TASKQ_STORE_FILE (the file the taskq servers read their store from),
# sets the role's password from it at every start, then becomes the
# postmaster.
# Extra arguments go to `postgres` (e.g. -c max_connections=200).
set -eu

fail() { echo "taskq-postgres: $*" >&2; exit 2; }

# The role, password and database: from the URL the taskq servers use, so
# that one file holds them.
[ -r "$TASKQ_STORE_FILE" ] ||
    fail "cannot read $TASKQ_STORE_FILE: give it postgres://USER:PASSWORD@postgres:5432/DB (compose: deploy/secrets/store)"
url=$(cat "$TASKQ_STORE_FILE")
rest=${url#postgres://}
[ "$rest" != "$url" ] || rest=${url#postgresql://}
[ "$rest" != "$url" ] || fail "$TASKQ_STORE_FILE: not a postgres:// URL"
userinfo=${rest%%@*}
[ "$userinfo" != "$rest" ] || fail "$TASKQ_STORE_FILE: no USER:PASSWORD@ before the host"
user=${userinfo%%:*}
password=${userinfo#*:}
[ "$password" != "$userinfo" ] || fail "$TASKQ_STORE_FILE: no password (USER:PASSWORD@)"
path=${rest#*@}
database=${path#*/}
[ "$database" != "$path" ] || fail "$TASKQ_STORE_FILE: no database (/DB after the host)"
database=${database%%\?*}
# The password goes into SQL below as it is: letters, digits and - . _ ~
# only, which need no quoting there nor escaping in the URL.
case "$password" in
    *[!A-Za-z0-9._~-]*) fail "$TASKQ_STORE_FILE: use only letters, digits and - . _ ~ in the password" ;;
esac
[ ${#password} -ge 16 ] || fail "$TASKQ_STORE_FILE: use a password of at least 16 characters"
for name in "$user" "$database"; do
    case "$name" in
        ''|[!a-z_]*|*[!a-z0-9_]*) fail "$TASKQ_STORE_FILE: role and database names: a-z 0-9 _, not starting with a digit ($name)" ;;
    esac
done

# Single-user mode runs each line of its input as a statement, with no
# server listening; it goes on after an error, so errors are looked for.
single() {
    out=$(postgres --single -D "$PGDATA" postgres 2>&1) || fail "postgres --single exited $?: $out"
    case "$out" in
        *ERROR:*) echo "$out" | grep "ERROR:" >&2; fail "setting up the role or database failed" ;;
    esac
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "taskq-postgres: making the cluster in $PGDATA"
    initdb -D "$PGDATA" -U postgres --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=peer --auth-host=scram-sha-256 >/dev/null
    # Connections from other containers, with a password only.
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    printf "CREATE ROLE %s LOGIN;\n" "$user" | single
    printf "CREATE DATABASE %s OWNER %s;\n" "$database" "$user" | single
fi
printf "ALTER ROLE %s PASSWORD '%s';\n" "$user" "$password" | single

exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
