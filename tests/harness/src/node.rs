//! One real Kubernetes node on this machine: containerd v2 + runc, the kubelet and
//! kube-proxy of the control plane's release, the bridge CNI plugin, and CoreDNS as the
//! cluster DNS. Pods scheduled onto it run real containers from images imported into its
//! containerd (there is no registry here: pods use `imagePullPolicy: Never`).
//!
//! The node is machine-wide state — a bridge, iptables chains, cgroups, sysctls, mounts —
//! so only one can run at a time: the cluster's reaper holds [`LOCK`] for the node's whole
//! life and runs `tests/node/teardown.sh` before it lets go, whether the test process
//! ended, panicked, was killed with `kill -9` or interrupted. Everything lives under
//! [`BASE`] and on the bridge [`BRIDGE`], so the teardown finds it without the process
//! that made it.
//!
//! Network layout: the bridge holds [`NODE_IP`], which is also the node's InternalIP, the
//! API server's address (pods reach it through the `kubernetes` Service) and the cluster
//! DNS server. Pods get addresses in [`POD_SUBNET`] and a route to the Service range only:
//! no default route, so nothing a pod sends can leave the machine.

use anyhow::{Context, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::binaries::{repo_root, run_cmd};

/// Where the node keeps its state, sockets and pid files (machine-wide, fixed so that a
/// teardown after a crash finds it).
pub const BASE: &str = "/run/switchyard-node";
/// The reaper holds this lock (flock) while a node exists.
pub const LOCK: &str = "/run/switchyard-node.lock";
/// The Linux bridge the pods are attached to.
pub const BRIDGE: &str = "swbr0";
/// The bridge's address: node IP, API server address, cluster DNS.
pub const NODE_IP: &str = "10.88.0.1";
/// The pods' addresses.
pub const POD_SUBNET: &str = "10.88.0.0/24";
/// The Service range (the API server's `--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The node's name in the cluster.
pub const NODE_NAME: &str = "switchyard-node";
/// The region label of the real node; kwok nodes serve the other regions.
pub const NODE_REGION: &str = "us-east";
/// The sandbox (pause) image every pod starts from, built here from `tests/node/pause`.
pub const PAUSE_IMAGE: &str = "localhost/switchyard-pause:dev";

/// Sysctls the kubelet, the bridge plugin and kube-proxy may change; saved before the node
/// starts and restored by the teardown.
pub const SAVED_SYSCTLS: [&str; 12] = [
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
];

/// Directories the kubelet and the CNI library create whatever they are configured with;
/// the teardown removes the ones the node created.
const HOST_DIRS: [&str; 3] = ["/var/lib/kubelet", "/var/log/containers", "/var/lib/cni"];

/// The directory of the node's binaries (containerd, its shim, ctr, crictl, CoreDNS,
/// pause), built by `tests/node/build.sh` if the cache lacks them.
pub fn ensure_binaries() -> anyhow::Result<PathBuf> {
    let dir = crate::binaries::run_build_script("tests/node/build.sh", &[])
        .context("the real node cannot be built")?;
    for name in [
        "containerd",
        "containerd-shim-runc-v2",
        "ctr",
        "crictl",
        "coredns",
        "pause",
    ] {
        if !dir.join(name).is_file() {
            bail!("{} has no {name}; run tests/node/build.sh", dir.display());
        }
    }
    Ok(dir)
}

/// Runs the teardown script (idempotent; a no-op when no node ran).
pub fn teardown() -> anyhow::Result<()> {
    let script = repo_root().join("tests/node/teardown.sh");
    let status = Command::new("bash")
        .arg(&script)
        .envs(teardown_env())
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(())
}

/// The environment of `tests/node/teardown.sh` when the caller's cluster holds the lock.
pub fn teardown_env() -> [(&'static str, &'static str); 4] {
    [
        ("SWITCHYARD_NODE_DIR", BASE),
        ("SWITCHYARD_NODE_BRIDGE", BRIDGE),
        ("SWITCHYARD_NODE_LOCK", LOCK),
        ("SWITCHYARD_NODE_LOCK_HELD", "1"),
    ]
}

/// Refuses to start where the node would disturb something that is not ours: another
/// Kubernetes on this host (its chains or cgroups without our run directory), or routes
/// that overlap the node's addresses.
fn check_host() -> anyhow::Result<()> {
    if Path::new(BASE).exists() {
        return Ok(());
    }
    let rules = Command::new("iptables-save")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if rules.lines().any(|l| l.starts_with(":KUBE-")) {
        bail!(
            "iptables holds KUBE-* chains that no Switchyard node made: another Kubernetes seems to run on this machine, and a real node here would disturb it"
        );
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            if e.path().join("kubepods").exists() || e.file_name() == "kubepods" {
                bail!(
                    "cgroup {} holds kubepods that no Switchyard node made: another Kubernetes seems to run on this machine",
                    e.path().display()
                );
            }
        }
    }
    let routes = Command::new("ip")
        .args(["-4", "route", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for route in routes.lines() {
        if route.starts_with("10.88.") || route.starts_with("10.96.") {
            bail!(
                "the route `{route}` overlaps the real node's pod range {POD_SUBNET} or Service range {SERVICE_CIDR}"
            );
        }
    }
    Ok(())
}

/// Prepares the host before the API server starts (it binds to the bridge): cleans what a
/// crashed node may have left, saves the sysctls, creates the bridge.
pub fn prepare_host(node_bins: &Path) -> anyhow::Result<()> {
    if Path::new(BASE).exists() || run_quiet("ip", &["link", "show", BRIDGE]) {
        eprintln!("[harness] removing what an earlier real node left behind");
    }
    teardown()?;
    check_host()?;
    std::fs::create_dir_all(Path::new(BASE).join("pids"))?;
    std::fs::create_dir_all(Path::new(BASE).join("created"))?;
    std::os::unix::fs::symlink(node_bins, Path::new(BASE).join("bin"))
        .context("linking the node's binaries")?;
    let mut saved = String::new();
    for key in SAVED_SYSCTLS {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        if let Ok(value) = std::fs::read_to_string(&path) {
            saved.push_str(&format!("{key}={}\n", value.trim()));
        }
    }
    std::fs::write(Path::new(BASE).join("sysctls.saved"), saved)?;
    for (i, dir) in HOST_DIRS.iter().enumerate() {
        if !Path::new(dir).exists() {
            std::fs::write(Path::new(BASE).join(format!("created/{i}")), dir)?;
        }
    }
    run(
        "ip",
        &["link", "add", BRIDGE, "type", "bridge"],
        "creating the bridge",
    )?;
    run(
        "ip",
        &["addr", "add", &format!("{NODE_IP}/24"), "dev", BRIDGE],
        "addressing the bridge",
    )?;
    run(
        "ip",
        &["link", "set", BRIDGE, "up"],
        "bringing the bridge up",
    )?;
    // The host reaches Service addresses (kubectl-less clients such as the demo's) over
    // the bridge, from the bridge's address, whatever its default route is.
    run(
        "ip",
        &["route", "add", SERVICE_CIDR, "dev", BRIDGE, "src", NODE_IP],
        "routing the Service range to the bridge",
    )?;
    // Pod → Service → pod on the same bridge needs bridged frames to pass iptables, and
    // the bridge plugin's gateway needs forwarding.
    write_sysctl("net.bridge.bridge-nf-call-iptables", "1")?;
    write_sysctl("net.ipv4.ip_forward", "1")?;
    Ok(())
}

/// The configuration files of one node, written under [`BASE`].
#[derive(Debug)]
pub struct NodeFiles {
    pub containerd_config: PathBuf,
    pub kubelet_config: PathBuf,
    pub kubelet_kubeconfig: PathBuf,
    pub kube_proxy_config: PathBuf,
    pub corefile: PathBuf,
}

/// Ports the node's agents listen on (loopback or the bridge), chosen free by the caller.
#[derive(Debug)]
pub struct NodePorts {
    pub kubelet: u16,
    pub kubelet_healthz: u16,
    pub proxy_healthz: u16,
    pub proxy_metrics: u16,
}

/// Writes the containerd, CNI, kubelet, kube-proxy and CoreDNS configuration.
/// `cluster_dir` holds the CA, the node's client certificate and the admin kubeconfig.
pub fn write_config(
    cluster_dir: &Path,
    server: &str,
    ports: &NodePorts,
) -> anyhow::Result<NodeFiles> {
    let base = Path::new(BASE);
    let p = |rel: &str| base.join(rel);
    // Containers' logs live with the cluster's, so a failed run keeps them.
    let pod_logs = cluster_dir.join("logs/pods");
    std::fs::create_dir_all(&pod_logs)?;
    // The kubelet links each container's log from /var/log/containers; the teardown
    // removes the links that point here.
    std::fs::write(p("pod-logs-dir"), pod_logs.display().to_string())?;
    for d in [
        "containerd/root",
        "containerd/state",
        "cni/net.d",
        "kubelet",
        "opt",
    ] {
        std::fs::create_dir_all(p(d))?;
    }
    let socket = containerd_socket();
    let containerd = format!(
        r#"version = 3
root = '{root}'
state = '{state}'
[grpc]
  address = '{sock}'
[ttrpc]
  address = '{sock}.ttrpc'
[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{PAUSE_IMAGE}'
  [plugins.'io.containerd.cri.v1.runtime']
    # Root here lacks CAP_SYS_RESOURCE: runc fails writing oom_score_adj below its own.
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    disable_apparmor = true
    cdi_spec_dirs = []
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['/usr/lib/cni']
      conf_dir = '{cni}'
  [plugins.'io.containerd.internal.v1.opt']
    path = '{opt}'
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
"#,
        root = p("containerd/root").display(),
        state = p("containerd/state").display(),
        sock = socket.display(),
        cni = p("cni/net.d").display(),
        opt = p("opt").display(),
    );
    std::fs::write(p("containerd.toml"), containerd)?;

    // Pods get a route to the Service range only: no default route, nothing leaves.
    let cni = format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "switchyard",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{BRIDGE}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{"subnet": "{POD_SUBNET}", "rangeStart": "10.88.0.10", "rangeEnd": "10.88.0.250", "gateway": "{NODE_IP}"}}]],
        "routes": [{{"dst": "{SERVICE_CIDR}", "gw": "{NODE_IP}"}}],
        "dataDir": "{ipam}"
      }}
    }},
    {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
  ]
}}
"#,
        ipam = p("cni/ipam").display(),
    );
    std::fs::write(p("cni/net.d/10-switchyard.conflist"), cni)?;

    let ca = cluster_dir.join("ca.crt");
    let kubelet_kubeconfig = p("kubelet.kubeconfig");
    std::fs::write(
        &kubelet_kubeconfig,
        crate::cluster::kubeconfig_text(
            server,
            &ca,
            &cluster_dir.join("node.crt"),
            &cluster_dir.join("node.key"),
        ),
    )?;
    // Pods resolve through the cluster DNS only; the host's resolver stays out.
    std::fs::write(p("resolv.conf"), format!("nameserver {NODE_IP}\n"))?;
    let kubelet = format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{sock}
clusterDNS: [{NODE_IP}]
clusterDomain: cluster.local
resolvConf: {resolv}
podLogsDir: {logs}
maxPods: 60
serializeImagePulls: false
# Images come from imports, not a registry: garbage-collecting one would lose it.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# The disk is shared with everything else on the machine.
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}}
nodeStatusUpdateFrequency: 5s
nodeStatusReportFrequency: 10s
shutdownGracePeriod: 0s
rotateCertificates: false
serverTLSBootstrap: false
"#,
        port = ports.kubelet,
        healthz = ports.kubelet_healthz,
        ca = ca.display(),
        sock = socket.display(),
        resolv = p("resolv.conf").display(),
        logs = pod_logs.display(),
    );
    std::fs::write(p("kubelet.yaml"), kubelet)?;

    let admin = cluster_dir.join("kubeconfig");
    let proxy = format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {admin}}}
hostnameOverride: {NODE_NAME}
mode: iptables
clusterCIDR: {POD_SUBNET}
bindAddress: {NODE_IP}
healthzBindAddress: 127.0.0.1:{healthz}
metricsBindAddress: 127.0.0.1:{metrics}
nodePortAddresses: ["{NODE_IP}/32"]
# Zeros leave the host's conntrack sysctls alone.
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
"#,
        admin = admin.display(),
        healthz = ports.proxy_healthz,
        metrics = ports.proxy_metrics,
    );
    std::fs::write(p("kube-proxy.yaml"), proxy)?;

    // Answers for the cluster's names only; there is no upstream to forward to.
    let corefile = format!(
        "cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {{\n    bind {NODE_IP}\n    errors\n    kubernetes cluster.local in-addr.arpa ip6.arpa {{\n        kubeconfig {admin} switchyard-local\n        pods insecure\n        ttl 5\n    }}\n    cache 5\n}}\n",
        admin = admin.display(),
    );
    std::fs::write(p("Corefile"), corefile)?;

    Ok(NodeFiles {
        containerd_config: p("containerd.toml"),
        kubelet_config: p("kubelet.yaml"),
        kubelet_kubeconfig,
        kube_proxy_config: p("kube-proxy.yaml"),
        corefile: p("Corefile"),
    })
}

/// Records a node agent's pid where the teardown finds it.
pub fn record_pid(name: &str, pid: u32) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(Path::new(BASE).join("pids").join(format!("{name}.pid")))?;
    writeln!(f, "{pid}")?;
    Ok(())
}

/// Builds the pause image from `tests/node/pause.Dockerfile` and imports it.
pub fn import_pause_image(node_bins: &Path) -> anyhow::Result<()> {
    let work = Path::new(BASE).join("pause-build");
    std::fs::create_dir_all(&work)?;
    std::fs::copy(node_bins.join("pause"), work.join("pause"))?;
    let tar = work.join("pause.tar");
    crate::images::buildah_archive(
        &work,
        &repo_root().join("tests/node/pause.Dockerfile"),
        PAUSE_IMAGE,
        &tar,
        None,
    )?;
    import_image(node_bins, &tar)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// The containerd socket the kubelet and `ctr` talk to.
pub fn containerd_socket() -> PathBuf {
    Path::new(BASE).join("containerd/containerd.sock")
}

/// Imports an OCI or Docker image archive into the node's containerd, where the kubelet
/// finds it by name.
pub fn import_image(node_bins: &Path, tar: &Path) -> anyhow::Result<()> {
    let mut cmd = Command::new(node_bins.join("ctr"));
    cmd.arg("--address")
        .arg(containerd_socket())
        .args(["-n", "k8s.io", "images", "import", "--local"])
        .arg(tar);
    run_cmd(cmd, &format!("importing {} into containerd", tar.display()))
}

fn write_sysctl(key: &str, value: &str) -> anyhow::Result<()> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(&path, value).with_context(|| format!("setting {key}={value}"))
}

fn run_quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(program: &str, args: &[&str], what: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_cmd(cmd, what)
}
