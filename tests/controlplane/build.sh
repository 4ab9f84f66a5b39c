#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm) and the real node's kubelet and kube-proxy (same
# release) from source through the Go module proxy, into a cache
# directory keyed by version. Idempotent: a binary already present is not rebuilt.
#
# Prints the bin directory on its last line of stdout; progress goes to stderr.
#   SWITCHYARD_CACHE   cache root (default: ~/.cache/switchyard)
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.1}"   # k8s-openapi 0.29 covers 1.37; the proxy refuses v1.37.2's zip
ETCD_VERSION="${ETCD_VERSION:-v3.7.0}"  # the version k8s.io/kubernetes@v1.37.2 requires
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${HELM_VERSION:-v4.3.1}"

CACHE_ROOT="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"
BIN="$CACHE_ROOT/controlplane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION/bin"
WORK="$CACHE_ROOT/controlplane/work"

say() { echo "[controlplane] $*" >&2; }
die() { echo "[controlplane] error: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "Go is not installed (need Go >= 1.26); install it and re-run"
GOV="$(go env GOVERSION)"
case "$GOV" in
  go1.2[6-9]*|go1.[3-9][0-9]*) ;;
  *) die "Go $GOV is too old; Kubernetes $K8S_VERSION needs Go >= 1.26" ;;
esac

mkdir -p "$BIN" "$WORK"
export CGO_ENABLED=0 GOFLAGS="-trimpath" GOTOOLCHAIN=local

have() { [ -x "$BIN/$1" ]; }

check_proxy() {
  local proxy
  proxy="$(go env GOPROXY | cut -d, -f1)"
  if [ "$proxy" != "off" ] && [ "$proxy" != "direct" ]; then
    curl -fsS -o /dev/null --max-time 20 "$proxy/k8s.io/kubernetes/@v/$K8S_VERSION.info" \
      || die "the Go module proxy ($proxy) does not answer for k8s.io/kubernetes@$K8S_VERSION"
  fi
}

build_kubernetes() {
  local dir="$WORK/kubernetes-$K8S_VERSION" minor gomod
  mkdir -p "$dir"
  say "resolving k8s.io/kubernetes@$K8S_VERSION"
  local json
  json="$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" 2>&1)" || true
  if echo "$json" | grep -q '"Error"'; then
    die "the Go module proxy cannot serve k8s.io/kubernetes@$K8S_VERSION: $(echo "$json" | sed -n 's/.*"Error": "\(.*\)",*$/\1/p')"
  fi
  gomod="$(echo "$json" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  [ -f "$gomod" ] || die "could not download the go.mod of k8s.io/kubernetes@$K8S_VERSION"
  # k8s.io/kubernetes replaces its staging modules with local paths, which a
  # dependent module cannot follow; point each at its published v0.<minor>.<patch>.
  minor="v0.${K8S_VERSION#v1.}"
  {
    echo "module switchyard.dev/controlplane-build"
    echo
    echo "go 1.26"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod" | grep -v '^k8s.io/sample-' \
      | while read -r m; do echo "	$m => $m $minor"; done
    echo ")"
  } > "$dir/go.mod"
  cat > "$dir/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
  say "go mod tidy (downloads modules through the proxy; a few minutes the first time)"
  (cd "$dir" && go mod tidy -e >&2) || die "go mod tidy failed for the Kubernetes wrapper module"
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
  ldflags="$ldflags -X k8s.io/component-base/version.gitMajor=1"
  ldflags="$ldflags -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)"
  ldflags="$ldflags -X k8s.io/component-base/version/verflag.programName=kubernetes"
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
    if have "$cmd"; then continue; fi
    say "building $cmd $K8S_VERSION"
    (cd "$dir" && go build -tags tools -ldflags "$ldflags" -o "$BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd") \
      || die "building $cmd failed"
    mv "$BIN/$cmd.tmp" "$BIN/$cmd"
  done
}

build_etcd() {
  local dir="$WORK/etcd-$ETCD_VERSION"
  mkdir -p "$dir"
  cat > "$dir/go.mod" <<GO
module switchyard.dev/etcd-build

go 1.26

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GO
  cat > "$dir/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  say "building etcd $ETCD_VERSION"
  (cd "$dir" && go mod tidy -e >&2 && go build -tags tools -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3) \
    || die "building etcd failed"
  mv "$BIN/etcd.tmp" "$BIN/etcd"
}

build_go_install() { # name package version
  local name="$1" pkg="$2" ver="$3" ldflags="${4:-}"
  say "building $name $ver"
  GOBIN="$WORK/gobin-$name-$ver" go install -ldflags "-s -w $ldflags" "$pkg@$ver" >&2 || die "building $name failed"
  mv "$WORK/gobin-$name-$ver/$name" "$BIN/$name"
}

missing=0
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy kwok helm; do have "$b" || missing=1; done
if [ "$missing" = 1 ]; then
  check_proxy
  start=$(date +%s)
  have etcd || build_etcd
  { have kube-apiserver && have kube-controller-manager && have kube-scheduler && have kubectl && have kubelet && have kube-proxy; } || build_kubernetes
  have kwok || build_go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION" \
    "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
  have helm || build_go_install helm helm.sh/helm/v4/cmd/helm "$HELM_VERSION" \
    "-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
  say "built in $(( $(date +%s) - start ))s"
fi
say "control plane binaries ready in $BIN"
echo "$BIN"
