#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and integration tests (against
# the real binaries over loopback), the cluster test (two nodes behind HAProxy), a 50,000-socket
# run of scripts/million.sh, the session property test at a million cases, the tuning kit's tests, and the Autobahn conformance run.
#
#   scripts/test.sh            everything
#   SKIP_AUTOBAHN=1 scripts/test.sh   everything but the conformance run (quicker while iterating)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build (debug binaries used by the integration tests)"
cargo build --workspace --bins

step "cargo test"
cargo test --workspace

step "cluster end-to-end (haproxy, redis)"
scripts/cluster-test.sh

step "one box, many sockets: scripts/million.sh at CI size (50,000 connections, 4 servers)"
scripts/million.sh --connections 50000 --keep 5 --ping-interval 3 --tune

step "session property test: 1,000,000 random frame sequences and splits (release)"
MEGASOCK_PROPERTY_CASES=1000000 cargo test --release --lib random_frames_and_splits -- --nocapture

step "tuning kit tests"
tests/tune/run.sh

# Last, so its closing line (`autobahn: N passed, N failed`) closes the output.
if [ "${SKIP_AUTOBAHN:-0}" != 1 ]; then
  step "Autobahn conformance (kosoku)"
  scripts/autobahn.sh
fi
