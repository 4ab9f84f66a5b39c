//! A real node outlives nothing: when the process that started it is killed with
//! `kill -9`, the reaper removes every trace of it from the machine — pods and their
//! shims, mounts, veths, the bridge, iptables chains, cgroups — and restores the sysctls
//! the kubelet and the network changed. (Its own test binary: a second real node cannot
//! start while another test binary's shared one holds the machine-wide lock.)

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::node::{BASE, BRIDGE, PAUSE_IMAGE, SAVED_SYSCTLS};
use harness::{Cluster, Options};

const CHILD_ENV: &str = "SWITCHYARD_TEARDOWN_CHILD";

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The sysctls the node may change, read fresh.
fn sysctls() -> Vec<(String, String)> {
    SAVED_SYSCTLS
        .iter()
        .map(|k| {
            let path = Path::new("/proc/sys").join(k.replace('.', "/"));
            (
                (*k).to_owned(),
                std::fs::read_to_string(path)
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            )
        })
        .collect()
}

/// What of a node is still on the machine, empty when nothing is.
fn traces() -> Vec<String> {
    let mut left = Vec::new();
    if Path::new(BASE).exists() {
        left.push(format!("{BASE} exists"));
    }
    if Command::new("ip")
        .args(["link", "show", BRIDGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        left.push(format!("bridge {BRIDGE}"));
    }
    let rules = Command::new("iptables-save")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if rules.lines().any(|l| l.starts_with(":KUBE-")) {
        left.push("iptables KUBE-* chains".into());
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let under = mounts.lines().filter(|l| l.contains(BASE)).count();
    if under > 0 {
        left.push(format!("{under} mounts under {BASE}"));
    }
    // cgroup v1 (one tree per controller) and v2 (one tree) alike.
    let trees = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default();
    for tree in trees
        .iter()
        .map(PathBuf::as_path)
        .chain([Path::new("/sys/fs/cgroup")])
    {
        for top in ["kubepods", "k8s.io"] {
            if tree.join(top).is_dir() {
                left.push(format!("cgroup {}", tree.join(top).display()));
            }
        }
    }
    if Command::new("ip")
        .args(["-o", "link", "show", "type", "veth"])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty())
    {
        left.push("veth interfaces".into());
    }
    let links = std::fs::read_dir("/var/log/containers").map_or(0, |d| d.count());
    if links > 0 {
        left.push(format!("{links} entries in /var/log/containers"));
    }
    let procs = Command::new("pgrep")
        .args(["-f", "containerd-shim-runc-v2|/pause$"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !procs.trim().is_empty() {
        left.push(format!(
            "processes {}",
            procs.split_whitespace().collect::<Vec<_>>().join(",")
        ));
    }
    left
}

/// In the child: boot a node, run two pods on it, say so, then wait to be killed.
fn child() {
    let cluster = Cluster::start_with(Options { real_node: true }).expect("a real node");
    let deployment = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: sleepers, namespace: default}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: sleepers}}}}\n  template:\n    metadata: {{labels: {{app: sleepers}}}}\n    spec:\n      nodeSelector: {{switchyard.dev/node: real}}\n      containers: [{{name: pause, image: '{PAUSE_IMAGE}', imagePullPolicy: Never}}]\n"
    );
    let (ok, _, err) = cluster
        .kubectl_input(&["apply", "-f", "-"], &deployment)
        .expect("kubectl");
    assert!(ok, "{err}");
    cluster
        .kubectl_ok(&["rollout", "status", "deployment/sleepers", "--timeout=120s"])
        .expect("two pods run on the real node");
    println!("NODE-UP");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[test]
fn a_killed_process_leaves_no_trace_of_its_real_node() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    // A node another test binary just stopped may still be tearing down: its reaper holds
    // the lock until it is done.
    let free = Command::new("flock")
        .args(["-w", "300", harness::node::LOCK, "true"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(free, "{} stayed held", harness::node::LOCK);
    let before = sysctls();
    assert!(
        traces().is_empty(),
        "the machine holds a real node already: {:?}",
        traces()
    );
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "a_killed_process_leaves_no_trace_of_its_real_node",
            "--exact",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("child starts");
    // Killed whatever happens, so a failed assertion does not leave a node running.
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("child stdout");
    let up = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("NODE-UP"));
    assert!(up, "the child never reported its node up");
    assert!(
        !traces().is_empty(),
        "a running node leaves traces the check can see"
    );
    assert_ne!(
        sysctls(),
        before,
        "the node changed sysctls (so restoring them is checked)"
    );

    // SIGKILL: no destructor runs; the reaper alone cleans up.
    child.0.kill().expect("kill -9");
    let _ = child.0.wait();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !traces().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(traces(), Vec::<String>::new(), "left on the machine");
    assert_eq!(sysctls(), before, "sysctls restored");
    // The lock is free again (the reaper lets go once it has stopped the control plane).
    let free = Command::new("flock")
        .args(["-w", "30", harness::node::LOCK, "true"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(free, "{} released", harness::node::LOCK);
}
