#!/usr/bin/env bash
# Runs the full benchmark (issue #5) in the release profile and rewrites bench/RESULTS.md.
# Takes about 6 minutes on 2 cores after the build. Loopback only; needs no root.
#
#   bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --locked --bench imds
