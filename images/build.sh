#!/usr/bin/env bash
# Builds the operator and gateway images on this machine without a Docker daemon and
# without pulling anything: cargo builds both binaries statically on the host, then
# buildah builds the `prebuilt` target of images/*.Dockerfile (FROM scratch, so there is
# no base image to fetch) and writes each image as an OCI archive:
#   target/image/switchyard-operator.tar   localhost/switchyard-operator:$IMAGE_TAG
#   target/image/switchyard-gateway.tar    localhost/switchyard-gateway:$IMAGE_TAG
#
# OCI rather than docker-archive: gzip layers, and the index names each image in full
# (org.opencontainers.image.ref.name), which containerd 2.x keeps on import as it is:
#   ctr -n k8s.io images import target/image/switchyard-gateway.tar
# containerd 1.x keeps it only with --base-name localhost/switchyard-gateway (a filter
# that this name passes, so passing it is safe on both).
#
# Buildah's storage is a throwaway directory under target/image, so nothing outside the
# repository is read or written. A second run over unchanged sources takes seconds and
# gives the same image digests (times come from the commit).
#
# Prints one line per image (sizes, archive) and, last, the directory holding the
# archives; progress goes to stderr.
#   IMAGE_TAG        image tag (default: dev)
#   EXTRA_BINARIES   more workspace binaries to build the same way into target/image/bin
#                    (the test kit's fake-provider and loadgen), in the same cargo run so
#                    that shared dependencies are built once
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${IMAGE_TAG:-dev}"
OUT="$PWD/target/image"
IMAGES=(operator gateway)

say() { echo "[images] $*" >&2; }
die() { echo "[images] error: $*" >&2; exit 1; }

if ! command -v buildah >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing buildah (apt)"
    log="$(mktemp)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah; } \
      >"$log" 2>&1 || { tail -20 "$log" >&2; die "apt-get install buildah failed (full log: $log)"; }
    rm -f "$log"
  else
    die "buildah is not installed; install it with: sudo apt-get install buildah"
  fi
fi

mkdir -p "$OUT/bin"
# One build at a time: they share the buildah storage and the archives.
exec 9>"$OUT/.lock"
flock 9

start=$(date +%s)
cargo="${CARGO:-cargo}"
host="$(rustc -vV | sed -n 's/^host: //p')"
[ -n "$host" ] || die "cannot read the host target from rustc -vV"

# glibc linked statically (crt-static) instead of musl, whose target is not installed
# here. --target keeps build scripts and proc-macros, which the compiler loads, dynamic.
say "building static binaries for $host"
extra=()
for bin in ${EXTRA_BINARIES:-}; do extra+=(-p "$bin"); done
RUSTFLAGS="-C target-feature=+crt-static" "$cargo" build --release --locked --target "$host" \
  -p switchyard-operator -p switchyard-gateway "${extra[@]}" >&2 || die "cargo build failed"
for name in "${IMAGES[@]}"; do
  install -m 0755 "${CARGO_TARGET_DIR:-target}/$host/release/switchyard-$name" "$OUT/bin/"
done
for bin in ${EXTRA_BINARIES:-}; do
  install -m 0755 "${CARGO_TARGET_DIR:-target}/$host/release/$bin" "$OUT/bin/"
done

package_version() { # package
  local id
  id="$("$cargo" pkgid --locked -p "$1")"
  echo "${id##*@}"
}
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
# File and history times from the commit, so the same sources give the same image digest.
epoch="$(git log -1 --format=%ct 2>/dev/null || echo 0)"

store="$OUT/.buildah"
rm -rf "$store"
trap 'rm -rf "$store"' EXIT
bh() { buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"; }

# The sum of the (compressed) layer sizes in an OCI archive's manifest.
layer_bytes() { # archive
  local manifest
  manifest="$(tar -xOf "$1" index.json | grep -o 'sha256:[0-9a-f]\{64\}' | head -1)"
  tar -xOf "$1" "blobs/sha256/${manifest#sha256:}" \
    | sed 's/.*"layers"//' | grep -o '"size":[0-9]*' | awk -F: '{ s += $2 } END { print s + 0 }'
}
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }

summary=()
for name in "${IMAGES[@]}"; do
  ref="localhost/switchyard-$name:$TAG"
  archive="$OUT/switchyard-$name.tar"
  version="$(package_version "switchyard-$name")" || die "cargo pkgid switchyard-$name failed"
  say "building $ref ($version)"
  # --squash: one layer holding the binary (the shared base stage would add an empty one).
  bh bud --quiet --squash --layers=false --pull=never --timestamp "$epoch" --target prebuilt \
    -f "images/$name.Dockerfile" -t "$ref" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    . >&2 || die "buildah bud images/$name.Dockerfile failed"
  rm -f "$archive.tmp"
  bh push --quiet "$ref" "oci-archive:$archive.tmp:$ref" >&2 || die "buildah push $ref failed"
  mv "$archive.tmp" "$archive"
  layers="$(layer_bytes "$archive")"
  binary="$(stat -c %s "$OUT/bin/switchyard-$name")"
  summary+=("$ref: layers $(mb "$layers") compressed ($layers bytes), binary $(mb "$binary") ($binary bytes), $archive")
done

say "images built in $(( $(date +%s) - start ))s"
printf '%s\n' "${summary[@]}"
echo "$OUT"
