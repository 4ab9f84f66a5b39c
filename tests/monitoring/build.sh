#!/usr/bin/env bash
# What the monitoring tests need: promtool (Debian's prometheus package, with apt) and the
# Prometheus Operator's CRDs, whose YAML ships inside its Go module (fetched through the
# Go module proxy into Go's module cache). Idempotent and quick once done.
#
# Prints the directory holding the CRDs on its last line of stdout; progress goes to stderr.
set -euo pipefail

VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
say() { echo "[monitoring] $*" >&2; }
die() { echo "[monitoring] error: $*" >&2; exit 1; }

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing prometheus and promtool (apt)"
    log="$(mktemp)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } \
      >"$log" 2>&1 || { tail -20 "$log" >&2; die "apt-get install prometheus failed (full log: $log)"; }
    rm -f "$log"
  else
    die "promtool is missing; install Debian's prometheus package (apt-get install prometheus)"
  fi
fi

command -v go >/dev/null || die "Go is needed to fetch the Prometheus Operator's CRDs"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
module="github.com/prometheus-operator/prometheus-operator@$VERSION"
say "fetching $module (Go module proxy)"
dir="$(cd "$work" && go mod download -json "$module" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
crds="$dir/example/prometheus-operator-crd"
[ -f "$crds/monitoring.coreos.com_podmonitors.yaml" ] || die "no CRDs in $crds"
echo "$crds"
