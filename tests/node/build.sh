#!/usr/bin/env bash
# Installs and builds what the real node needs besides kubelet and kube-proxy (those come
# from tests/controlplane/build.sh, the same Kubernetes release as the control plane):
#   - Debian packages: runc, the CNI plugins, iptables, conntrack, buildah (images)
#   - containerd v2, its runc shim and ctr; crictl; CoreDNS (cluster DNS); a pause program
#     (the pod sandbox) — from the Go module proxy into a cache directory keyed by version.
# Idempotent: what is present is not installed or built again.
#
# Prints the bin directory on its last line of stdout; progress goes to stderr.
#   SWITCHYARD_CACHE   cache root (default: ~/.cache/switchyard)
set -euo pipefail
cd "$(dirname "$0")"

CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.2.9}"
CRICTL_VERSION="${CRICTL_VERSION:-v1.37.0}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.15.0}"

CACHE_ROOT="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"
BIN="$CACHE_ROOT/node/containerd-$CONTAINERD_VERSION-crictl-$CRICTL_VERSION-coredns-$COREDNS_VERSION/bin"
WORK="$CACHE_ROOT/node/work"

say() { echo "[node] $*" >&2; }
die() { echo "[node] error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "the real node needs root (it runs containerd, the kubelet and kube-proxy)"
[ "$(uname -s)" = Linux ] || die "the real node needs Linux"

# Debian's packages: the OCI runtime, the CNI plugins, the packet filter kube-proxy
# programs, and a daemonless image builder.
packages=()
command -v runc >/dev/null || packages+=(runc)
[ -x /usr/lib/cni/bridge ] || packages+=(containernetworking-plugins)
command -v iptables >/dev/null || packages+=(iptables)
command -v conntrack >/dev/null || packages+=(conntrack)
command -v buildah >/dev/null || packages+=(buildah)
command -v ip >/dev/null || packages+=(iproute2)
if [ "${#packages[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${packages[*]} and no apt-get to install them"
  say "installing ${packages[*]} (apt)"
  log="$(mktemp)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"; } \
    >"$log" 2>&1 || { tail -20 "$log" >&2; die "apt-get install ${packages[*]} failed (full log: $log)"; }
  rm -f "$log"
fi

command -v go >/dev/null 2>&1 || die "Go is not installed (need Go >= 1.26)"
mkdir -p "$BIN" "$WORK"
export CGO_ENABLED=0 GOFLAGS="-trimpath" GOTOOLCHAIN=local

have() { [ -x "$BIN/$1" ]; }

go_install() { # name package version
  local name="$1" pkg="$2" ver="$3" ldflags="${4:-}"
  have "$name" && return 0
  say "building $name $ver"
  GOBIN="$WORK/gobin-$name-$ver" go install -ldflags "-s -w $ldflags" "$pkg@$ver" >&2 || die "building $name failed"
  mv "$WORK/gobin-$name-$ver/$name" "$BIN/$name"
}

start=$(date +%s)
built=0
for b in containerd containerd-shim-runc-v2 ctr crictl coredns pause; do have "$b" || built=1; done
go_install containerd github.com/containerd/containerd/v2/cmd/containerd "$CONTAINERD_VERSION" \
  "-X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
go_install containerd-shim-runc-v2 github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 "$CONTAINERD_VERSION"
go_install ctr github.com/containerd/containerd/v2/cmd/ctr "$CONTAINERD_VERSION"
go_install crictl sigs.k8s.io/cri-tools/cmd/crictl "$CRICTL_VERSION"
go_install coredns github.com/coredns/coredns "$COREDNS_VERSION"
if ! have pause; then
  say "building pause"
  (cd pause && go build -ldflags "-s -w" -o "$BIN/pause.tmp" .) || die "building pause failed"
  mv "$BIN/pause.tmp" "$BIN/pause"
fi
[ "$built" = 1 ] && say "built in $(( $(date +%s) - start ))s"
say "node binaries ready in $BIN"
echo "$BIN"
