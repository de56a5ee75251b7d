#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server on 127.0.0.1 for the fleet test (tests/test_fleet.py) and
# prints the export line for its URL. Usage:  eval "$(bash scripts/postgres.sh start)"; ...;
# bash scripts/postgres.sh stop. Needs Debian's postgresql package (installed if missing, as root).
set -euo pipefail
dir=/tmp/nf4-explorer-pg
port=${NF4_EXPLORER_PG_PORT:-54329}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
case "${1:-start}" in
start)
    if [ -z "$bin" ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null
        bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    runas() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi; }
    runas "$bin/pg_ctl -D $dir stop -m fast" >/dev/null 2>&1 || true
    rm -rf "$dir" && mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    runas "$bin/initdb -D $dir -A trust -U postgres" >/dev/null
    runas "$bin/pg_ctl -D $dir -l $dir/server.log -w -o '-p $port -k $dir -c listen_addresses=127.0.0.1' start" >/dev/null
    runas "$bin/createdb -h 127.0.0.1 -p $port -U postgres nf4_fleet"
    echo "export NF4_EXPLORER_TEST_POSTGRES=postgresql+psycopg2://postgres@127.0.0.1:$port/nf4_fleet"
    ;;
stop)
    if [ -n "$bin" ] && [ -d "$dir" ]; then
        if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$bin/pg_ctl -D $dir stop -m fast" >/dev/null 2>&1 || true
        else "$bin/pg_ctl" -D "$dir" stop -m fast >/dev/null 2>&1 || true; fi
    fi
    ;;
esac
