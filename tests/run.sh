#!/usr/bin/env bash
# Runs every test of imds-broker, from a fresh machine: installs what the suite needs, checks the
# admission policies (deploy/) with a CEL interpreter and the alerting rules (deploy/prometheus/) with
# promtool, builds once in the dev profile, then runs formatting and lint checks, the deploy/ checks
# (kustomize renders against the Kubernetes schemas and the binary's --help, tests/deploy), unit and
# integration tests (cargo-nextest),
# the end-to-end suite (network namespaces + iptables + real SDKs; needs root), the benchmark smoke
# run and a bounded fuzzing run (fuzz/run.sh). Exits non-zero on the first failure.
#
#   sudo ./tests/run.sh            # everything
#   SKIP_E2E=1 ./tests/run.sh      # without the root-only end-to-end suite (for quick local runs)
#   SKIP_FUZZ=1 ./tests/run.sh     # without fuzzing (its build alone takes a quarter of an hour)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

step "system packages"
missing=()
# prometheus: Debian's promtool checks the alerting rules, and the e2e suite runs its prometheus binary.
for pair in iptables:iptables conntrack:conntrack ip:iproute2 curl:curl promtool:prometheus; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then echo "need root to install: ${missing[*]}" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian's package starts Prometheus (and its node exporter) as services; the suite runs its own.
  if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
  fi
fi
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest

step "python virtualenv (boto3, moto[server], pytest, cel-python, PyYAML)"
if [ ! -x .venv/bin/python ] || ! cmp -s tests/requirements.txt .venv/.requirements 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
  cp tests/requirements.txt .venv/.requirements
fi
export IMDS_BROKER_TEST_PYTHON="$root/.venv/bin/python"

# Seconds, and no build needed: first, so that a broken policy fails fast.
step "admission policy (CEL)"
.venv/bin/python -m pytest -q tests/policy

step "alerting rules (promtool check, promtool test, the PrometheusRule component)"
.venv/bin/python -m pytest -q tests/prometheus

step "format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings

step "build (dev profile, once: binary, examples, tests)"
cargo build --locked --bins --examples
cargo nextest run --locked --no-run

# Needs the binary's --help (the dev build above) and kustomize: kubectl's, or a standalone one.
step "deploy manifests (kustomize render, Kubernetes schemas, flags, image tag)"
if ! command -v kubectl >/dev/null 2>&1 && ! command -v kustomize >/dev/null 2>&1; then
  echo "tests/deploy needs kubectl (kubectl kustomize) or kustomize on PATH" >&2
  exit 1
fi
.venv/bin/python -m pytest -q -p no:cacheprovider tests/deploy

step "unit and integration tests"
cargo nextest run --locked --no-fail-fast

if [ -z "${SKIP_E2E:-}" ] && [ -x tests/e2e/run.sh ]; then
  # The DaemonSet's image, around the dev binary just built; the e2e suite runs it (test_split_image.py).
  step "agent image (deploy/image/build.sh)"
  deploy/image/build.sh --binary target/debug/imds-broker
  IMDS_BROKER_IMAGE="$(deploy/image/build.sh --image-name)"
  export IMDS_BROKER_IMAGE
  step "end-to-end suite (network namespaces, iptables, real SDKs)"
  tests/e2e/run.sh
fi

if [ -x bench/smoke.sh ]; then
  step "benchmark smoke run"
  bench/smoke.sh
fi

if [ -z "${SKIP_FUZZ:-}" ]; then
  step "fuzzing (corpus replay, then ${FUZZ_SECONDS:-30} s per target)"
  fuzz/run.sh
fi

step "all tests passed"
