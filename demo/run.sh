#!/usr/bin/env bash
# The imds-broker demo, one command on a fresh Debian/Ubuntu machine. NEEDS ROOT (network namespaces,
# iptables):   sudo demo/run.sh
#
# Installs what is missing (apt: iproute2 iptables conntrack python3-venv; Python venvs under target/),
# builds the agent and the kube API double, then on this machine, isolated from its real network:
# starts the kube API double, moto as STS, three "pods" (network namespaces) with different roles, and the
# agent with --iptables; runs a legacy SDK (AWS CLI 1.16.286, IMDSv1 only) and current boto3 in each pod;
# prints who got which role; cleans everything up, also on failure or Ctrl-C.
# Needs a Rust toolchain (cargo) for the build; a few minutes on first run, seconds after.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '\n[demo] %s\n' "$*"; }

if [[ $EUID -ne 0 ]]; then
  echo "demo/run.sh needs root: it creates network namespaces and iptables rules. Run: sudo $0" >&2
  exit 1
fi

say "installing what is missing (apt packages, Python virtualenvs)"
"$ROOT/tests/e2e/setup.sh" --no-js

export IMDS_BROKER_BIN="${IMDS_BROKER_BIN:-$ROOT/target/debug/imds-broker}"
export DOUBLES_BIN="${DOUBLES_BIN:-$ROOT/target/debug/examples/doubles}"
build=(cargo build --bin imds-broker --example doubles)
say "building: ${build[*]}"
if command -v cargo >/dev/null; then
  (cd "$ROOT" && "${build[@]}")
elif [[ -n "${SUDO_USER:-}" ]] && sudo -u "$SUDO_USER" -H bash -lc 'command -v cargo' >/dev/null 2>&1; then
  # rustup installs per user; under sudo, build as the user who called it.
  sudo -u "$SUDO_USER" -H bash -lc "cd '$ROOT' && ${build[*]}"
else
  echo "cargo not found: install a Rust toolchain (https://rustup.rs), then run this again" >&2
  exit 1
fi

PY="$ROOT/target/e2e-venv/bin/python"
trap '"$PY" "$ROOT/tests/e2e/harness.py" cleanup --prefix imdsd' EXIT
say "running the demo"
"$PY" "$ROOT/demo/demo.py"
