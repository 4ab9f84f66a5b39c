#!/usr/bin/env bash
# Runs every test of Switchyard on a fresh machine: installs what is missing, builds the
# local control plane (cached), checks formatting, lints, CRD drift, then runs the unit,
# integration and end-to-end tiers, and finally checks that nothing was left running.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo; echo "==> $*"; }

step "toolchain"
command -v cargo >/dev/null || { echo "cargo is required (install Rust with rustup)"; exit 1; }
command -v go >/dev/null || { echo "Go >= 1.26 is required to build the local control plane"; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
cargo --version; go version

step "python venv for the real-client tests (tests/gateway/requirements.txt)"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import openai, pytest' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q -r tests/gateway/requirements.txt
if [ ! -x .venv-litellm/bin/python ] || ! .venv-litellm/bin/python -c 'import litellm' 2>/dev/null; then
  python3 -m venv .venv-litellm
  .venv-litellm/bin/pip install -q --upgrade pip
fi
.venv-litellm/bin/pip install -q -r tests/gateway/requirements-litellm.txt

step "local control plane (built once through the Go module proxy, then cached)"
bash tests/controlplane/build.sh >/dev/null

step "real node: runc, CNI plugins, iptables, buildah (apt); containerd, crictl, CoreDNS (cached)"
bash tests/node/build.sh >/dev/null

# This run's temporary files (cluster directories among them) live in a directory of its
# own, so leftovers are this run's alone, whatever else the machine is doing.
export TMPDIR="$(mktemp -d "${TMPDIR:-/tmp}/switchyard-run-XXXXXX")"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "generated CRDs match the API types"
cargo run -q -p crds --bin crdgen -- --check

step "cargo test --workspace (unit, integration, end-to-end)"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"

step "gateway tier: real gateway and fake providers, driven by the openai SDK"
.venv/bin/python -m pytest tests/gateway -q -p no:cacheprovider 2>&1 | tee -a "$log"

step "no test left a process or cluster directory behind"
sleep 3
leftover="$(pgrep -af "$TMPDIR/switchyard-cp-|target/debug/(fake-provider|switchyard-gateway)|switchyard-node" || true)"
if [ -n "$leftover" ]; then
  echo "processes left running:"; echo "$leftover"; exit 1
fi
left="$(ls -d "$TMPDIR"/switchyard-cp-* 2>/dev/null || true)"
if [ -n "$left" ]; then
  echo "cluster directories left behind:"; echo "$left"; exit 1
fi
# The real node's machine-wide state: its run directory, bridge, chains and cgroups. A
# reaper still tearing a node down holds the lock until it is done.
flock -w 120 /run/switchyard-node.lock true || { echo "a real node is still running"; exit 1; }
node_left=""
[ -e /run/switchyard-node ] && node_left+=" /run/switchyard-node"
ip link show swbr0 >/dev/null 2>&1 && node_left+=" bridge swbr0"
iptables-save 2>/dev/null | grep -q '^:KUBE-' && node_left+=" iptables KUBE-* chains"
ls -d /sys/fs/cgroup/*/kubepods >/dev/null 2>&1 && node_left+=" kubepods cgroups"
pgrep -f 'containerd-shim-runc-v2|/kubelet |kube-proxy|coredns -conf' >/dev/null && node_left+=" node processes"
if [ -n "$node_left" ]; then
  echo "the real node left behind:$node_left"; exit 1
fi
echo "none"

# cargo's "test result: ok. N passed; M failed" lines plus pytest's "N passed[, M failed]".
awk '
  /^test result:/ { p += $4; f += $6 }
  /^[0-9]+ (passed|failed)/ && / in [0-9.]+s/ {
    for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i }
  }
  END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
rm -rf "$TMPDIR"
