#!/usr/bin/env bash
# Runs the benchmark harness with tiny counts (a few seconds) in the dev profile, reusing the dev build
# of the dependencies and of the imds-broker binary. Fails only if a scenario produced no numbers;
# never on timings. Writes target/bench-logs/SMOKE.md.
#
#   bench/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --locked --bench imds -- --smoke
