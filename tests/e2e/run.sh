#!/usr/bin/env bash
# The end-to-end suite: pods as network namespaces, the agent with --iptables, the kube API double, moto as
# STS, and real SDKs (boto3, botocore 1.13.22, AWS CLI v1 old and new, JS v3 and v2, Go v1 and v2, Rust)
# inside the pods.
# Needs root. Expects the binaries to be built already (CI builds once):
#   cargo build --bins --examples
# Override them with IMDS_BROKER_BIN, DOUBLES_BIN, RUST_PROBE_BIN. Extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ $EUID -ne 0 ]]; then
  echo "tests/e2e/run.sh needs root (network namespaces and iptables)" >&2
  exit 1
fi
export IMDS_BROKER_BIN="${IMDS_BROKER_BIN:-$ROOT/target/debug/imds-broker}"
export DOUBLES_BIN="${DOUBLES_BIN:-$ROOT/target/debug/examples/doubles}"
export RUST_PROBE_BIN="${RUST_PROBE_BIN:-$ROOT/target/debug/examples/rust-probe}"
for bin in "$IMDS_BROKER_BIN" "$DOUBLES_BIN" "$RUST_PROBE_BIN"; do
  [[ -x "$bin" ]] || { echo "missing $bin: run 'cargo build --bins --examples' first" >&2; exit 1; }
done

"$ROOT/tests/e2e/setup.sh"
PY="$ROOT/target/e2e-venv/bin/python"
# Whatever happens to pytest (failure, Ctrl-C, a kill of its process), namespaces and rules go away.
trap '"$PY" "$ROOT/tests/e2e/harness.py" cleanup --prefix imdsb' EXIT
"$PY" -m pytest -p no:cacheprovider -v "$ROOT/tests/e2e" "$@"
