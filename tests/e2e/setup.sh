#!/usr/bin/env bash
# Installs what the end-to-end suite and the demo need, idempotently: Debian packages (only when a tool
# is missing), Python virtual environments and the Go probes under target/, and the JavaScript SDKs under
# tests/e2e/js.
#
#   target/e2e-venv         pytest, moto[server] (the STS double), boto3/botocore current
#   target/e2e-venv-cli     AWS CLI v1, current
#   target/e2e-venv-legacy  awscli 1.16.286 + botocore 1.13.22: the last releases before IMDSv2 (v1 only)
#   target/go-v1-probe      AWS SDK for Go v1 1.44.133 (Debian's golang-github-aws-aws-sdk-go-dev)
#   target/go-v2-probe      AWS SDK for Go v2 1.17.1 (Debian's golang-github-aws-aws-sdk-go-v2-dev)
# The two Go probes (tests/e2e/go) are built offline from Debian's packaged sources (GOPATH mode), for
# test_container_old_sdks.py: releases whose container provider accepts loopback hosts only.
#
# Usage: tests/e2e/setup.sh [--no-js]     (root is needed only if a Debian package is missing)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
WITH_JS=1
[[ "${1:-}" == "--no-js" ]] && WITH_JS=0

log() { printf '[setup] %s\n' "$*" >&2; }

missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables >/dev/null || missing+=(iptables)
command -v conntrack >/dev/null || missing+=(conntrack)
command -v "$PYTHON" >/dev/null || missing+=(python3)
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
GOCODE=/usr/share/gocode/src/github.com/aws
command -v go >/dev/null || missing+=(golang-go)
[[ -f $GOCODE/aws-sdk-go/aws/version.go ]] || missing+=(golang-github-aws-aws-sdk-go-dev)
[[ -f $GOCODE/aws-sdk-go-v2/config/config.go ]] || missing+=(golang-github-aws-aws-sdk-go-v2-dev)
if [[ $WITH_JS == 1 ]]; then
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
fi
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# venv NAME STAMP PACKAGES...: (re)creates target/NAME when the package list changed.
venv() {
  local dir="$ROOT/target/$1"; shift
  local want="$*"
  if [[ -x "$dir/bin/python" && -f "$dir/.e2e-packages" && "$(cat "$dir/.e2e-packages")" == "$want" ]]; then
    return
  fi
  log "creating $dir ($want)"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check "$@"
  printf '%s' "$want" >"$dir/.e2e-packages"
}

mkdir -p "$ROOT/target"
venv e2e-venv "pytest>=8,<9" "moto[server]>=5,<6" "boto3>=1.35"
venv e2e-venv-cli "awscli>=1.36,<2"
# botocore 1.13.22 is the last release without IMDSv2 (see shared IMDS.md §8); awscli 1.16.286 pins it.
# Its dependency ranges (urllib3<1.26, docutils<0.16, jmespath<1) still install and import on Python 3.11.
venv e2e-venv-legacy "awscli==1.16.286" "botocore==1.13.22"
# botocore 1.13.22 subclasses collections.MutableMapping, an alias Python 3.10 removed, so it does not import
# on Debian 12's Python 3.11, and no IMDSv1-only botocore does. Restore the aliases at interpreter start;
# botocore's own code, including its IMDS client, runs unchanged.
site="$("$ROOT/target/e2e-venv-legacy/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [[ ! -f "$site/e2e_collections_abc_aliases.pth" ]]; then
  cat >"$site/e2e_collections_abc_aliases.py" <<'PY'
import collections
import collections.abc

for _name in collections.abc.__all__:
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))
PY
  echo "import e2e_collections_abc_aliases" >"$site/e2e_collections_abc_aliases.pth"
fi
"$ROOT/target/e2e-venv-legacy/bin/python" -W ignore -c 'import botocore.session' \
  || { log "botocore 1.13.22 does not import"; exit 1; }

for v in v1 v2; do
  src="$ROOT/tests/e2e/go/$v/main.go" bin="$ROOT/target/go-$v-probe"
  if [[ ! -x "$bin" || "$src" -nt "$bin" ]]; then
    log "building $bin"
    GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$ROOT/target/go-cache" GOFLAGS= \
      go build -o "$bin" "$src"
  fi
done

if [[ $WITH_JS == 1 ]]; then
  js="$ROOT/tests/e2e/js"
  if [[ ! -d "$js/node_modules/@aws-sdk/credential-providers" || ! -d "$js/node_modules/aws-sdk" || "$js/package-lock.json" -nt "$js/node_modules/.package-lock.json" ]]; then
    log "npm ci in $js"
    (cd "$js" && npm ci --no-audit --no-fund --loglevel=error)
  fi
fi
log "ready"
