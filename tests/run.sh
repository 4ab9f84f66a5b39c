#!/usr/bin/env bash
# Runs every test of Switchyard on a fresh machine: installs what is missing, builds the
# local control plane (cached), checks formatting, lints, CRD drift, then runs the unit,
# integration and end-to-end tiers, and finally checks that nothing it started was left
# running.
#
# One line per step with its time; installs and builds write their details to a log file
# (its path is printed when they fail), tests print as they run. A step silent for 25 s
# gets a "still running" line. Whatever happens, the end shows every step's time and the
# test totals.
set -euo pipefail
cd "$(dirname "$0")/.."

# This run's temporary files (cluster directories among them) live in a directory of its
# own, and every process it starts inherits SWITCHYARD_RUN, so the leftover check at the
# end judges only what this run started, whatever else the machine is doing.
export TMPDIR="$(mktemp -d "${TMPDIR:-/tmp}/switchyard-run-XXXXXX")"
export SWITCHYARD_RUN="${TMPDIR##*/}"
details="$TMPDIR/details.log"   # installs and builds
tests_log="$TMPDIR/tests.log"   # test output, for the totals
: >"$details"; : >"$tests_log"
run_started=$SECONDS
steps=()
current=""

elapsed() { local s=$1; if ((s >= 60)); then printf '%dm%02ds' $((s / 60)) $((s % 60)); else printf '%ds' "$s"; fi; }

# Prints a line when `file` (what the step shows on the screen) has not grown for 25 s
# while step `name` runs, so the screen never stays silent for 30 s.
heartbeat() {
  local name=$1 file=$2 started=$SECONDS last_size=-1 quiet_since=$SECONDS size nap
  # Its sleep goes with it, so no stray process outlives the step.
  trap 'kill "$nap" 2>/dev/null; exit 0' TERM
  while :; do
    sleep 1 & nap=$!
    wait "$nap"
    size=$(stat -c %s "$file" 2>/dev/null || echo 0)
    if [ "$size" != "$last_size" ]; then last_size=$size; quiet_since=$SECONDS; continue; fi
    if ((SECONDS - quiet_since >= 25)); then
      echo "    ... $name: still running ($(elapsed $((SECONDS - started))))"
      quiet_since=$SECONDS
    fi
  done
}

# step NAME quiet|loud COMMAND...: quiet steps write to the details log, loud ones to the
# screen (and the tests log). Fails the run when COMMAND fails. (A shell function given as
# COMMAND runs without errexit, so the functions below return their failures explicitly.)
hb=""
step() {
  local name=$1 mode=$2; shift 2
  current=$name
  echo "==> $name"
  # What reaches the screen: nothing from a quiet step, the tests log from a loud one.
  local started=$SECONDS rc=0 watched=/dev/null
  [ "$mode" = loud ] && watched=$tests_log
  heartbeat "$name" "$watched" & hb=$!
  if [ "$mode" = quiet ]; then
    { echo "==> $name"; "$@"; } >>"$details" 2>&1 || rc=$?
  else
    set +e
    "$@" 2>&1 | tee -a "$tests_log"
    rc=${PIPESTATUS[0]}
    set -e
  fi
  kill "$hb" 2>/dev/null; wait "$hb" 2>/dev/null || true
  hb=""
  local took=$((SECONDS - started))
  if ((rc != 0)); then
    steps+=("$(printf '%8s  FAILED  %s' "$(elapsed $took)" "$name")")
    if [ "$mode" = quiet ]; then
      echo "    FAILED after $(elapsed $took); the last lines of $details:"
      tail -n 25 "$details" | sed 's/^/    | /'
    fi
    exit "$rc"
  fi
  steps+=("$(printf '%8s  ok      %s' "$(elapsed $took)" "$name")")
  echo "    ok ($(elapsed $took))"
  current=""
}

summary() {
  local rc=$?
  [ -n "$hb" ] && kill "$hb" 2>/dev/null
  echo
  echo "==> summary"
  printf '    %s\n' "${steps[@]}"
  [ -n "$current" ] && echo "    (stopped at: $current)"
  # cargo's "test result: ok. N passed; M failed" lines plus pytest's "N passed[, M failed]".
  awk '
    /^test result:/ { p += $4; f += $6 }
    /^[0-9]+ (passed|failed)/ && / in [0-9.]+s/ {
      for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i }
    }
    END { printf "    tests: %d passed, %d failed\n", p, f }' "$tests_log"
  echo "    total: $(elapsed $((SECONDS - run_started)))"
  if ((rc == 0)); then
    rm -rf "$TMPDIR"
  else
    echo "    failed; install and build details: $details"
  fi
}
trap summary EXIT

command -v cargo >/dev/null || { echo "cargo is required (install Rust with rustup)"; exit 1; }
command -v go >/dev/null || { echo "Go >= 1.26 is required to build the local control plane"; exit 1; }
echo "cargo: $(cargo --version); go: $(go version | cut -d' ' -f3)"

toolchain() {
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt || return 1
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy || return 1
}
step "toolchain components (rustfmt, clippy)" quiet toolchain

venv() {  # venv DIR MODULE REQUIREMENTS
  if [ ! -x "$1/bin/python" ] || ! "$1/bin/python" -c "import $2" 2>/dev/null; then
    python3 -m venv "$1" || { echo "python3 -m venv failed: on Debian, apt install python3-venv"; return 1; }
    "$1/bin/pip" install -q --upgrade pip || return 1
  fi
  "$1/bin/pip" install -q -r "$3"
}
venvs() {
  venv .venv "openai, pytest" tests/gateway/requirements.txt || return 1
  venv .venv-litellm litellm tests/gateway/requirements-litellm.txt
}
step "python venvs for the real-client tests (openai SDK, pytest, LiteLLM)" quiet venvs

step "local control plane (built once through the Go module proxy, then cached)" quiet \
  bash tests/controlplane/build.sh

step "real node: runc, CNI plugins, iptables, buildah (apt); containerd, crictl, CoreDNS (cached)" quiet \
  bash tests/node/build.sh

step "monitoring: promtool (apt), the Prometheus Operator's CRDs (Go module proxy, cached)" quiet \
  bash tests/monitoring/build.sh

step "cargo fmt --check" loud cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings" loud cargo clippy --workspace --all-targets -- -D warnings
step "generated CRDs match the API types" loud cargo run -q -p crds --bin crdgen -- --check
step "cargo test --workspace (unit, integration, end-to-end)" loud cargo test --workspace
step "gateway tier: real gateway and fake providers, driven by the openai SDK" loud \
  .venv/bin/python -m pytest tests/gateway -q -p no:cacheprovider

# Processes carrying this run's marker that are no longer descendants of this script:
# whatever a test started and did not stop (its orphans are re-parented away from here).
own_processes() {
  python3 - "$SWITCHYARD_RUN" "$$" <<'PY'
import os, sys
marker, root = ("SWITCHYARD_RUN=" + sys.argv[1]).encode(), int(sys.argv[2])

def ppid(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0

def ours_still(pid):
    while pid > 1:
        if pid == root:
            return True
        pid = ppid(pid)
    return False

for entry in os.listdir("/proc"):
    if not entry.isdigit():
        continue
    pid = int(entry)
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        continue
    if marker in env and not ours_still(pid):
        print(pid, cmd)
PY
}

leftovers() {
  sleep 3
  local left
  left="$(own_processes)" || return 1
  if [ -n "$left" ]; then
    echo "processes left running:"; echo "$left"; return 1
  fi
  left="$(ls -d "$TMPDIR"/switchyard-cp-* 2>/dev/null || true)"
  if [ -n "$left" ]; then
    echo "cluster directories left behind:"; echo "$left"; return 1
  fi
  # The real node's machine-wide state: its run directory, bridge, chains and cgroups. A
  # reaper still tearing a node down holds the lock until it is done.
  flock -w 120 /run/switchyard-node.lock true || { echo "a real node is still running"; return 1; }
  local node_left=""
  [ -e /run/switchyard-node ] && node_left+=" /run/switchyard-node"
  ip link show swbr0 >/dev/null 2>&1 && node_left+=" bridge swbr0"
  iptables-save 2>/dev/null | grep -q '^:KUBE-' && node_left+=" iptables KUBE-* chains"
  ls -d /sys/fs/cgroup/*/kubepods >/dev/null 2>&1 && node_left+=" kubepods cgroups"
  pgrep -f 'containerd-shim-runc-v2|/kubelet |kube-proxy|coredns -conf' >/dev/null && node_left+=" node processes"
  if [ -n "$node_left" ]; then
    echo "the real node left behind:$node_left"; return 1
  fi
  echo "none"
}
step "nothing this run started was left running" loud leftovers
