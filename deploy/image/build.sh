#!/usr/bin/env bash
# Builds the agent image with podman, without any registry: the base is a Debian root filesystem made
# here with mmdebstrap from Debian's packages and imported into podman (cached, keyed by the suite and
# the package list of the Containerfile), then deploy/image/Containerfile is built on it. The image is
# tagged imds-broker:<version in Cargo.toml> (podman lists it as localhost/imds-broker:<version>).
# Needs root (mmdebstrap, rootful podman); installs podman, runc and mmdebstrap with apt if missing.
#
#   sudo deploy/image/build.sh                                # cargo build --release, then the image
#   sudo deploy/image/build.sh --binary target/debug/imds-broker  # a binary built already (stripped copy)
#   deploy/image/build.sh --podman-args                       # the podman flags it uses, one a line
#   deploy/image/build.sh --image-name                        # the image it tags
#
# Environment: IMDS_BROKER_DEBIAN_SUITE (bookworm), IMDS_BROKER_DEBIAN_MIRROR (deb.debian.org),
# IMDS_BROKER_STORAGE_DRIVER (overlay or vfs; found out when unset), IMDS_BROKER_REVISION (the
# revision label outside git).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CONTAINERFILE="$ROOT/deploy/image/Containerfile"
SUITE="${IMDS_BROKER_DEBIAN_SUITE:-bookworm}"
MIRROR="${IMDS_BROKER_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
GRAPHROOT=/var/lib/containers/storage

usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 64; }

# Which storage driver podman should use. A store that exists already keeps the driver its database
# recorded (naming another one, or naming one when it recorded none, is an error), so then none is
# named. A new store gets overlay if the kernel mounts an overlay on the store's filesystem here (not
# on overlayfs itself, nor in some containers), otherwise vfs (slower and bigger, works everywhere).
storage_args() {
  if [[ -n "${IMDS_BROKER_STORAGE_DRIVER:-}" ]]; then
    printf '%s\n' --storage-driver "$IMDS_BROKER_STORAGE_DRIVER"
    return
  fi
  [[ -e "$GRAPHROOT/libpod/bolt_state.db" ]] && return
  mkdir -p "$(dirname "$GRAPHROOT")"
  local probe driver=vfs
  probe="$(mktemp -d "$(dirname "$GRAPHROOT")/overlay-probe.XXXXXX")"
  mkdir "$probe/lower" "$probe/upper" "$probe/work" "$probe/merged"
  if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
    "$probe/merged" 2>/dev/null; then
    umount "$probe/merged"
    driver=overlay
  fi
  rm -rf "$probe"
  printf '%s\n' --storage-driver "$driver"
}

podman_args() {
  local args=(--cgroup-manager cgroupfs)
  mapfile -t -O 2 args < <(storage_args)
  # Debian's runc (crun is podman's first choice where installed; either works).
  if command -v runc >/dev/null 2>&1; then args=(--runtime runc "${args[@]}"); fi
  printf '%s\n' "${args[@]}"
}

version="$(sed -n '/^\[package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n1)"
image="localhost/imds-broker:$version"

binary=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --binary) [[ $# -ge 2 ]] || usage; binary="$2"; shift 2 ;;
    --podman-args) podman_args; exit 0 ;;
    --image-name) echo "$image"; exit 0 ;;
    -h | --help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done

if [[ $EUID -ne 0 ]]; then
  echo "deploy/image/build.sh needs root (mmdebstrap and rootful podman)" >&2
  exit 1
fi

started=$SECONDS
missing=()
for pair in podman:podman runc:runc mmdebstrap:mmdebstrap strip:binutils; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "==> installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
mapfile -t global < <(podman_args)
podman=(podman "${global[@]}")
echo "==> podman ${global[*]} (storage driver: $("${podman[@]}" info --format '{{.Store.GraphDriverName}}'))"
# podman's default limits exceed what some hosts (this CI's among them) allow a container.
limits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The binary, in a build context of its own (the repository's target/ holds gigabytes), at the
# Containerfile's default path (the one Containerfile.dockerignore lets through; podman reads it too).
mkdir -p "$work/context/deploy/image" "$work/context/target/release"
cp "$ROOT/deploy/image/iptables-backend" "$work/context/deploy/image/"
if [[ -z "$binary" ]]; then
  echo "==> cargo build --release"
  (cd "$ROOT" && cargo build --release --locked --bin imds-broker)
  binary="$ROOT/target/release/imds-broker"
fi
[[ -x "$binary" ]] || { echo "no executable at $binary" >&2; exit 1; }
staged="$work/context/target/release/imds-broker"
strip -o "$staged" "$binary"
# The revision label is the one the binary itself reports (build.rs), so a binary older than the
# checkout is never labelled as HEAD; git (or IMDS_BROKER_REVISION) only for one that cannot run here.
if reported="$("$staged" --version 2>/dev/null)" && [[ "$reported" =~ \(rev\ ([^\)]+)\)$ ]]; then
  revision="${BASH_REMATCH[1]}"
else
  revision="$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo "${IMDS_BROKER_REVISION:-unknown}")"
fi

# The base: Debian's minimal system (apt included, for the Containerfile's package queries) with the
# image's packages, keyed by everything that decides its contents. The Containerfile's package lists
# are the ones used here.
packages="$(sed -n 's/^ARG \(PACKAGES\|EXTRA\)="\(.*\)"$/\2/p' "$CONTAINERFILE" | tr '\n' ' ')"
[[ -n "${packages// /}" ]] || { echo "no ARG PACKAGES in $CONTAINERFILE" >&2; exit 1; }
key="$(printf '%s\n' "$SUITE" "$MIRROR" minbase $packages | sha256sum | cut -c1-16)"
base="localhost/imds-broker-base:$SUITE-$key"
if "${podman[@]}" image exists "$base"; then
  echo "==> base $base (cached)"
else
  echo "==> base $base: mmdebstrap $SUITE minbase + $packages"
  mmdebstrap --variant=minbase --include="${packages// /,}" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    "$SUITE" "$work/base.tar" "$MIRROR"
  "${podman[@]}" import --change 'CMD ["/bin/sh"]' "$work/base.tar" "$base" >/dev/null
  rm -f "$work/base.tar"
  # Bases of other package lists or suites are of no further use.
  "${podman[@]}" images --format '{{.Repository}}:{{.Tag}}' --filter reference=localhost/imds-broker-base \
    | while read -r old; do [[ "$old" == "$base" ]] || "${podman[@]}" rmi "$old" >/dev/null || true; done
fi

previous="$("${podman[@]}" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
echo "==> podman build $image (revision $revision)"
# --network host: only used if the base lacks a package (apt-get then runs in the build).
# --no-cache: buildah 1.28 reuses a cached LABEL step whatever the build arguments say (seen here:
# the revision label of the previous build); the whole build takes seconds.
"${podman[@]}" build --no-cache --network host "${limits[@]}" --pull=never \
  -f "$CONTAINERFILE" \
  --build-arg BASE="$base" \
  --build-arg VERSION="$version" --build-arg REVISION="$revision" \
  -t "$image" "$work/context"
current="$("${podman[@]}" image inspect --format '{{.Id}}' "$image")"
if [[ -n "$previous" && "$previous" != "$current" ]]; then
  "${podman[@]}" rmi "$previous" >/dev/null 2>&1 || true
fi

# The image runs: the binary, its libraries, and the revision it was built from.
said="$("${podman[@]}" run --rm "${limits[@]}" --network none "$image" --version)"
echo "$said"
[[ "$said" == "imds-broker $version (rev $revision)" ]] || { echo "unexpected --version output" >&2; exit 1; }

size="$("${podman[@]}" image inspect --format '{{.Size}}' "$image")"
echo "==> $image: $((size / 1000000)) MB ($size bytes), built in $((SECONDS - started)) s"
"${podman[@]}" images "$image"
