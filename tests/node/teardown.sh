#!/usr/bin/env bash
# Removes everything the real node put on this machine, in an order that leaves nothing
# behind: node agents → pods → containerd → its shims → what is left in the pods'
# cgroups → iptables chains → mounts → veths and the bridge → cgroups → files it made
# outside its run directory → sysctls.
#
# Ownership: the node's run directory is the marker. Without it nothing here is ours and
# the script does nothing, so a host that runs another Kubernetes (k3s, kubeadm) is never
# touched. The run directory is removed last, so a teardown cut short is finished by the
# next one.
#
# Idempotent. The harness runs it before starting a node (after a crash that even the
# reaper did not survive) and when the node stops, holding the node lock; run by hand it
# takes the lock itself and refuses while a node is running.
#   bash tests/node/teardown.sh        # as root
set -u
BASE="${SWITCHYARD_NODE_DIR:-/run/switchyard-node}"
BRIDGE="${SWITCHYARD_NODE_BRIDGE:-swbr0}"
LOCK="${SWITCHYARD_NODE_LOCK:-/run/switchyard-node.lock}"
[ "$(id -u)" = 0 ] || { echo "teardown.sh: needs root" >&2; exit 1; }

say() { [ -n "${QUIET:-}" ] || echo "[node teardown] $*" >&2; }

if [ -z "${SWITCHYARD_NODE_LOCK_HELD:-}" ]; then
  exec 9>"$LOCK"
  flock -n 9 || { echo "teardown.sh: a real node is running (its cluster holds $LOCK); stop it first" >&2; exit 1; }
fi
[ -d "$BASE" ] || exit 0

stop_pidfile() { # name: TERM, then KILL after a grace period; only if the pid is still it
  local f="$BASE/pids/$1.pid" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$1"; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$f"
}

# Agents first, so nothing starts pods again or rewrites rules while we remove them.
stop_pidfile kubelet
stop_pidfile kube-proxy
stop_pidfile coredns

# Pods, while containerd still runs: the CRI stops containers and tears their networks down.
if [ -S "$BASE/containerd/containerd.sock" ] && [ -x "$BASE/bin/crictl" ]; then
  timeout 60 "$BASE/bin/crictl" --runtime-endpoint "unix://$BASE/containerd/containerd.sock" \
    --timeout 20s rmp -fa >/dev/null 2>&1 || say "crictl rmp failed; killing what is left"
fi
stop_pidfile containerd

# Shims outlive containerd; they are found by the socket address under our run directory.
for pid in $(pgrep -f "containerd-shim-runc-v2 .*$BASE/" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done

# Any container process still alive is in a cgroup under kubepods (the kubelet's cgroupfs
# parent) or k8s.io (containerd's): kill what is there.
kill_cgroup_tree() {
  local root="$1" f
  [ -d "$root" ] || return 0
  while IFS= read -r f; do
    while read -r pid; do [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null; done <"$f"
  done < <(find "$root" -name cgroup.procs 2>/dev/null)
}
for ctl in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
  kill_cgroup_tree "${ctl}kubepods"
  kill_cgroup_tree "${ctl}k8s.io"
done

# Packet filter: rules that jump into KUBE-/CNI- chains from the built-in chains, then the
# chains themselves (kube-proxy's, the kubelet's and the portmap plugin's). Each change
# goes through iptables-restore, which parses the rule's quoting itself (nothing is
# evaluated by the shell).
restore_line() { # tool table line
  printf '*%s\n%s\nCOMMIT\n' "$2" "$3" | "${1}-restore" -w --noflush 2>/dev/null
}
clean_chains() {
  local tool="$1" table rule chain chains
  command -v "$tool" >/dev/null || return 0
  for table in filter nat mangle raw; do
    "$tool" -w -t "$table" -S >/dev/null 2>&1 || continue
    while IFS= read -r rule; do
      restore_line "$tool" "$table" "-D ${rule#-A }"
    done < <("$tool" -w -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ ' | grep -E -- '-j (KUBE-|CNI-)' | grep -vE '^-A (KUBE-|CNI-)')
    chains="$("$tool" -w -t "$table" -S 2>/dev/null | sed -n 's/^-N \(\(KUBE\|CNI\)-[^ ]*\)$/\1/p')"
    for chain in $chains; do restore_line "$tool" "$table" "-F $chain"; done
    for chain in $chains; do restore_line "$tool" "$table" "-X $chain"; done
  done
}
clean_chains iptables
clean_chains ip6tables

# Mounts under the run directory, deepest first (pod volumes, netns, shm, rootfs).
for m in $(awk -v b="$BASE/" 'index($2, b) == 1 { print $2 }' /proc/mounts | sort -r); do
  umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
done

# Network: veths on the bridge, then the bridge (its addresses and routes go with it).
if ip link show "$BRIDGE" >/dev/null 2>&1; then
  for veth in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip link del "$veth" 2>/dev/null
  done
  ip link del "$BRIDGE" 2>/dev/null
fi

# Cgroups the kubelet and containerd made, deepest first; only empty ones can go.
for ctl in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
  for top in kubepods k8s.io; do
    [ -d "$ctl$top" ] && find "$ctl$top" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
done

# Files the kubelet and the CNI library write outside the run directory whatever they are
# told: removed when the node created them, else only the entries that point at ours.
for created in "$BASE"/created/*; do
  [ -f "$created" ] || continue
  path="$(cat "$created")"
  case "$path" in /var/lib/kubelet|/var/log/containers|/var/lib/cni) rm -rf "$path" ;; esac
done
if [ -f "$BASE/pod-logs-dir" ] && [ -d /var/log/containers ]; then
  pod_logs="$(cat "$BASE/pod-logs-dir")"
  for link in /var/log/containers/*; do
    [ -L "$link" ] && case "$(readlink "$link")" in "$pod_logs"/*) rm -f "$link" ;; esac
  done
fi

# Sysctls the kubelet, the bridge plugin and kube-proxy changed, as they were before.
if [ -f "$BASE/sysctls.saved" ]; then
  while IFS='=' read -r key value; do
    [ -n "$key" ] && sysctl -q -w "$key=$value" >/dev/null 2>&1
  done <"$BASE/sysctls.saved"
fi

left="$(awk -v b="$BASE/" 'index($2, b) == 1' /proc/mounts | wc -l)"
if [ "$left" != 0 ]; then
  say "$left mounts under $BASE could not be removed; leaving the directory"
  exit 1
fi
rm -rf "$BASE"
exit 0
