#!/usr/bin/env bash
# Install (if needed) and start a local PostgreSQL on 127.0.0.1 for the ledger tests, make a role
# and a database, and print the SQLAlchemy URL on stdout (everything else goes to stderr):
#
#     export EXAONE_TEST_PG_URL="$(bash .ci/postgres.sh)"
#
# Idempotent: safe to run again on a machine where it already ran. Written for root on Debian 12;
# the server itself runs as the `postgres` system user (PostgreSQL refuses to run as root).
set -euo pipefail

PG_ROLE=${PG_ROLE:-exaone}
PG_PASSWORD=${PG_PASSWORD:-exaone}
PG_DB=${PG_DB:-exaone_test}

log() { echo "postgres.sh: $*" >&2; }
if [ "$(id -u)" = 0 ]; then
    as_root() { "$@"; }
    as_postgres() { su -s /bin/sh postgres -c "cd / && $*"; }  # cd: the caller's directory may be closed to it
else
    as_root() { sudo "$@"; }
    as_postgres() { sudo -u postgres sh -c "cd / && $*"; }
fi

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v pg_lsclusters >/dev/null; then
    log "installing postgresql"
    as_root apt-get update -q >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
fi

VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
# Debian's package makes the cluster "<version> main" on install; a stripped image may not have it.
if ! pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {found = 1} END {exit !found}'; then
    log "creating cluster $VERSION main"
    as_root pg_createcluster "$VERSION" main >&2
fi
PORT=$(pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $3}')
STATUS=$(pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $4}')
if [ "$STATUS" != "online" ]; then
    log "starting cluster $VERSION main on 127.0.0.1:$PORT"
    # Loopback only, whatever postgresql.conf says; pg_ctlcluster switches to the postgres user.
    as_root pg_ctlcluster "$VERSION" main start -o "-c listen_addresses=127.0.0.1" >&2
fi
for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p "$PORT" && break
    sleep 1
done
pg_isready -h 127.0.0.1 -p "$PORT" >&2

psql_admin() { as_postgres "psql -X -q -v ON_ERROR_STOP=1 -p $PORT -tAc \"$1\""; }
if [ "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname = '$PG_ROLE'")" != "1" ]; then
    log "creating role $PG_ROLE"
    psql_admin "CREATE ROLE $PG_ROLE LOGIN PASSWORD '$PG_PASSWORD'"
else
    psql_admin "ALTER ROLE $PG_ROLE LOGIN PASSWORD '$PG_PASSWORD'"
fi
if [ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != "1" ]; then
    log "creating database $PG_DB"
    psql_admin "CREATE DATABASE $PG_DB OWNER $PG_ROLE"
fi

echo "postgresql+psycopg://$PG_ROLE:$PG_PASSWORD@127.0.0.1:$PORT/$PG_DB"
