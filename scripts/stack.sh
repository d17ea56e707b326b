#!/usr/bin/env bash
# Runs the whole stack on embedded defaults and shows it working: finds or
# starts a Postgres (a database `kafka_triggers` on it), then runs control
# plane + one data-plane node + an in-process Kafka broker + a local webhook
# receiver, and creates a demo trigger. Builds `kt` too and puts it on the
# PATH of .stack/env. Ctrl-C stops it all.
#
#   scripts/stack.sh                      everything embedded
#   scripts/stack.sh --brokers host:9092  use your Kafka instead of the in-process one
#
# Extra arguments go to the `stack` program (`scripts/stack.sh --help`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

kt_prepare

# The stack gets a database of its own on that server.
admin_url="$DATABASE_URL"
db_name="${KT_STACK_DATABASE:-kafka_triggers}"
if ! psql -w -X -q -d "$admin_url" -tAc "SELECT 1 FROM pg_database WHERE datname = '$db_name'" | grep -q 1; then
    kt_log "creating database $db_name"
    psql -w -X -q -d "$admin_url" -c "CREATE DATABASE \"$db_name\"" >/dev/null
fi
DATABASE_URL="$(printf '%s' "$admin_url" | sed -E "s#/[^/?]*(\?|$)#/$db_name\1#")"
export DATABASE_URL

kt_log "building (release; the first build takes a few minutes)"
cargo build --release -q -p kt-tests --bin stack -p kt-cli --bin kt
bin_dir="${CARGO_TARGET_DIR:-$ROOT/target}/release"
# `kt` sits next to `stack`, which adds this directory to PATH in .stack/env.
kt_log "kt is at $bin_dir/kt (on PATH after: source .stack/env)"
kt_log "grpcurl is at $GRPCURL"
"$bin_dir/stack" "$@"
