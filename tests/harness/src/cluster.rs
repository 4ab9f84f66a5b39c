//! Starting, using and tearing down the local control plane.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::binaries::Binaries;
use crate::{node, pki};

/// The regions the kwok nodes are labelled with; the same as `kind-config.yaml`.
pub const REGIONS: [&str; 3] = ["us-east", "us-west", "eu-west"];

/// Zones per region; each zone gets one kwok node.
const ZONES: [&str; 2] = ["a", "b"];

/// Ignores Ctrl-C (which reaches the whole foreground process group), waits for the
/// test process to go away, then stops the components and removes the directory unless
/// a test failed and asked to keep it. With a real node (`$3` is its teardown script) it
/// first takes the machine-wide node lock (`$4`) and holds it until the node is torn
/// down, so one node runs at a time and none outlives its cluster.
const REAPER: &str = r#"
trap '' INT TERM HUP
parent="$1"; dir="$2"; teardown="$3"; lock="$4"
if [ -n "$teardown" ]; then
  exec 9>"$lock"
  if ! flock -n 9; then
    touch "$dir/node-lock-waiting"
    flock -w 1800 9 || { touch "$dir/node-lock-failed"; exit 1; }
  fi
  touch "$dir/node-locked"
fi
while kill -0 "$parent" 2>/dev/null && [ ! -e "$dir/stopped" ]; do sleep 0.3; done
[ -n "$teardown" ] && QUIET=1 bash "$teardown" >>"$dir/logs/teardown.log" 2>&1
if [ -f "$dir/pids" ]; then
  for p in $(cat "$dir/pids"); do kill -TERM "$p" 2>/dev/null; done
  sleep 1
  for p in $(cat "$dir/pids"); do kill -KILL "$p" 2>/dev/null; done
fi
# Kept for a failed test: its logs only, never etcd's data (Secrets) or the CA's key.
if [ -e "$dir/keep" ]; then
  find "$dir" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
else
  rm -rf "$dir"
fi
"#;

/// How often a controller-manager, scheduler or kwok that exits is started again. In a
/// real cluster the kubelet restarts these static pods; a control plane that still
/// cannot stay up after that is broken and the boot fails, naming the log.
const MAX_RESTARTS: u32 = 3;

/// Components that only talk to the API server, so starting one again is safe.
const RESTARTABLE: [&str; 3] = ["kube-controller-manager", "kube-scheduler", "kwok"];

/// How many lines of a component's log an error quotes.
const LOG_TAIL_LINES: usize = 12;

/// One started control-plane component or node agent.
#[derive(Debug)]
struct Component {
    name: String,
    args: Vec<String>,
    child: Child,
    restarts: u32,
}

/// What to start besides the control plane.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// A real node (kubelet, containerd, kube-proxy, CoreDNS) in region
    /// [`node::NODE_REGION`], in place of that region's kwok nodes. Needs root; one per
    /// machine at a time (a second waits for the first).
    pub real_node: bool,
}

/// A running control plane.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    bins: Binaries,
    kubeconfig: PathBuf,
    server: String,
    children: Mutex<Vec<Component>>,
    reaper: Mutex<Option<Child>>,
    namespaces: AtomicU32,
    /// With a real node: the directory of its binaries (containerd, crictl, ...).
    node: Option<PathBuf>,
}

static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

impl Cluster {
    /// One cluster for every test of this process, started on first use. Its components
    /// are stopped by the reaper when the process exits.
    pub fn shared() -> &'static Cluster {
        match SHARED.get_or_init(|| Cluster::start().map_err(|e| format!("{e:#}"))) {
            Ok(cluster) => cluster,
            Err(e) => panic!("{e}"),
        }
    }

    /// Starts a new control plane and waits until it serves and its nodes are Ready.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default())
    }

    /// Starts a new control plane with `options`.
    pub fn start_with(options: Options) -> anyhow::Result<Self> {
        let started = Instant::now();
        let bins = Binaries::ensure()?;
        let node_bins = if options.real_node {
            Some(node::ensure_binaries()?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("switchyard-cp-")
            .tempdir()
            .context("creating the cluster directory")?
            .keep();
        std::fs::create_dir_all(dir.join("logs"))?;
        let teardown = if options.real_node {
            crate::repo_root().join("tests/node/teardown.sh")
        } else {
            PathBuf::new()
        };
        let reaper = Command::new("bash")
            .arg("-c")
            .arg(REAPER)
            .arg("reaper")
            .arg(std::process::id().to_string())
            .arg(&dir)
            .arg(&teardown)
            .arg(node::LOCK)
            .envs(node::teardown_env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the reaper")?;
        let kubeconfig = dir.join("kubeconfig");
        let mut cluster = Cluster {
            dir,
            bins,
            kubeconfig,
            server: String::new(),
            children: Mutex::new(Vec::new()),
            reaper: Mutex::new(Some(reaper)),
            namespaces: AtomicU32::new(0),
            node: node_bins,
        };
        if let Err(e) = cluster.boot() {
            cluster.keep_logs();
            return Err(e.context(format!(
                "the control plane did not start; component logs are kept in {}",
                cluster.logs_dir().display()
            )));
        }
        eprintln!(
            "[harness] control plane ready in {:.1}s at {} (kubeconfig {})",
            started.elapsed().as_secs_f64(),
            cluster.server,
            cluster.kubeconfig.display()
        );
        Ok(cluster)
    }

    fn boot(&mut self) -> anyhow::Result<()> {
        let d = self.dir.clone();
        pki::generate(&d)?;
        // With a real node the API server listens on the bridge, where pods (through the
        // `kubernetes` Service) and the kubelet reach it; otherwise on loopback.
        let api_ip = if let Some(node_bins) = &self.node {
            self.wait_for_node_lock()?;
            node::prepare_host(node_bins)?;
            node::NODE_IP
        } else {
            "127.0.0.1"
        };
        let etcd_port = free_port()?;
        let etcd_peer = free_port()?;
        let api_port = free_port()?;
        self.server = format!("https://{api_ip}:{api_port}");
        self.write_kubeconfig()?;
        let p = |name: &str| d.join(name).display().to_string();
        let kubeconfig = self.kubeconfig.display().to_string();

        self.spawn(
            "etcd",
            &[
                "--name=default".into(),
                format!("--data-dir={}", p("etcd-data")),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        self.wait_for("etcd /health", Duration::from_secs(30), || {
            http_get_contains(etcd_port, "/health", "true")
        })?;

        let mut api_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            format!("--bind-address={api_ip}"),
            format!("--advertise-address={api_ip}"),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", p("apiserver-certs")),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            format!("--service-cluster-ip-range={}", node::SERVICE_CIDR),
            "--allow-privileged=true".into(),
            "--enable-priority-and-fairness=false".into(),
            "--v=1".into(),
        ];
        if self.node.is_some() {
            api_args.extend([
                // Pods reach the API through the `kubernetes` Service, whose endpoint the
                // lease reconciler keeps at the advertised address.
                "--endpoint-reconciler-type=lease".into(),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                format!("--kubelet-client-certificate={}", p("admin.crt")),
                format!("--kubelet-client-key={}", p("admin.key")),
                // The node has no DNS name the API server could resolve (kubectl logs).
                "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
            ]);
        } else {
            api_args.extend([
                "--authorization-mode=RBAC".into(),
                "--endpoint-reconciler-type=none".into(),
            ]);
        }
        self.spawn("kube-apiserver", &api_args)?;
        self.wait_for("kube-apiserver /readyz", Duration::from_secs(90), || {
            self.kubectl()
                .args(["get", "--raw", "/readyz"])
                .output()
                .is_ok_and(|o| o.status.success())
        })?;

        let kcm_port = free_port()?;
        self.spawn(
            "kube-controller-manager",
            &[
                format!("--kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={kcm_port}"),
                "--leader-elect=false".into(),
                format!("--service-account-private-key-file={}", p("sa.key")),
                format!("--root-ca-file={}", p("ca.crt")),
                format!("--cluster-signing-cert-file={}", p("ca.crt")),
                format!("--cluster-signing-key-file={}", p("ca.key")),
                "--use-service-account-credentials=false".into(),
                // Nodes are simulated: no kubelet posts heartbeats, so the node lifecycle
                // controller would taint them unreachable and evict the gateways.
                "--controllers=*,-node-lifecycle-controller".into(),
                // The defaults (20/30) make the ReplicaSet and Deployment controllers, not
                // the operator, the bottleneck when hundreds of pools roll out at once; a
                // control plane sized for that many workloads raises them too.
                "--kube-api-qps=200".into(),
                "--kube-api-burst=400".into(),
            ],
        )?;
        let sched_port = free_port()?;
        self.spawn(
            "kube-scheduler",
            &[
                format!("--kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={sched_port}"),
                "--leader-elect=false".into(),
                // As for the controller-manager (defaults 50/100).
                "--kube-api-qps=200".into(),
                "--kube-api-burst=400".into(),
            ],
        )?;
        let kwok_port = free_port()?;
        self.spawn(
            "kwok",
            &[
                format!("--kubeconfig={kubeconfig}"),
                "--manage-all-nodes=false".into(),
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
                "--cidr=10.244.0.0/16".into(),
                "--node-ip=127.0.0.1".into(),
                format!("--server-address=127.0.0.1:{kwok_port}"),
                format!(
                    "--config={}",
                    crate::repo_root()
                        .join("tests/controlplane/kwok-stages.yaml")
                        .display()
                ),
            ],
        )?;

        let skip_region = self.node.as_ref().map(|_| node::NODE_REGION);
        self.kubectl_stdin(&["apply", "-f", "-"], &nodes_manifest(skip_region))?;
        let kwok_nodes = REGIONS.iter().filter(|r| Some(**r) != skip_region).count() * ZONES.len();
        self.wait_for("kwok nodes Ready", Duration::from_secs(60), || {
            self.kubectl_ok(&[
                "get",
                "nodes",
                "-o",
                "jsonpath={.items[*].status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .is_ok_and(|s| s.split_whitespace().filter(|s| *s == "True").count() >= kwok_nodes)
        })?;
        if self.node.is_some() {
            self.start_node()?;
        }
        // The API server taints new nodes not-ready; the node lifecycle controller that
        // would lift the taint is off (see above), so lift it here.
        self.kubectl_ok(&["taint", "nodes", "--all", "node.kubernetes.io/not-ready-"])?;
        // Pods are admitted only once the namespace's default ServiceAccount exists, which
        // proves the controller-manager is working.
        self.wait_for(
            "the default ServiceAccount",
            Duration::from_secs(60),
            || {
                self.kubectl_ok(&["get", "serviceaccount", "default", "-n", "default"])
                    .is_ok()
            },
        )?;
        Ok(())
    }

    /// Waits for the reaper to hold the machine-wide node lock, saying so when another
    /// real node holds it.
    fn wait_for_node_lock(&self) -> anyhow::Result<()> {
        let mut said = false;
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            if self.dir.join("node-locked").exists() {
                return Ok(());
            }
            if self.dir.join("node-lock-failed").exists() || Instant::now() > deadline {
                bail!("another real node kept {} for 30 minutes", node::LOCK);
            }
            let reaper_gone = self
                .reaper
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .as_mut()
                .is_none_or(|r| r.try_wait().ok().flatten().is_some());
            if reaper_gone && !self.dir.join("node-locked").exists() {
                bail!(
                    "the reaper exited before taking the node lock {} (is flock installed?)",
                    node::LOCK
                );
            }
            if !said && self.dir.join("node-lock-waiting").exists() {
                eprintln!(
                    "[harness] another real node runs on this machine (lock {}); waiting for it to stop",
                    node::LOCK
                );
                said = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts containerd, the kubelet, kube-proxy and CoreDNS, and waits for the node to
    /// be Ready.
    fn start_node(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let bins = self.node.as_ref().context("no real node was asked for")?;
        let ports = node::NodePorts {
            kubelet: free_port()?,
            kubelet_healthz: free_port()?,
            proxy_healthz: free_port()?,
            proxy_metrics: free_port()?,
        };
        let files = node::write_config(&self.dir, &self.server, &ports)?;
        let path = format!(
            "{}:{}",
            bins.display(),
            std::env::var("PATH").unwrap_or_default()
        );

        let mut containerd = Command::new(bins.join("containerd"));
        containerd
            .arg("--config")
            .arg(&files.containerd_config)
            .env("PATH", &path);
        self.spawn_node("containerd", containerd)?;
        let crictl = |args: &[&str]| {
            Command::new(bins.join("crictl"))
                .arg("--runtime-endpoint")
                .arg(format!("unix://{}", node::containerd_socket().display()))
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        self.wait_for("containerd's CRI", Duration::from_secs(60), || {
            crictl(&["info"])
        })?;
        node::import_pause_image(bins)?;

        let mut kubelet = Command::new(self.bins.path("kubelet"));
        kubelet
            .arg(format!("--config={}", files.kubelet_config.display()))
            .arg(format!(
                "--kubeconfig={}",
                files.kubelet_kubeconfig.display()
            ))
            .arg(format!("--root-dir={}/kubelet", node::BASE))
            .arg(format!("--hostname-override={}", node::NODE_NAME))
            .arg(format!("--node-ip={}", node::NODE_IP))
            .arg(format!(
                "--node-labels=topology.kubernetes.io/region={r},topology.kubernetes.io/zone={r}-a,switchyard.dev/node=real",
                r = node::NODE_REGION
            ))
            .arg("--v=1")
            .env("PATH", &path);
        self.spawn_node("kubelet", kubelet)?;

        let mut proxy = Command::new(self.bins.path("kube-proxy"));
        proxy
            .arg(format!("--config={}", files.kube_proxy_config.display()))
            .env("PATH", &path);
        self.spawn_node("kube-proxy", proxy)?;

        let mut coredns = Command::new(bins.join("coredns"));
        coredns.arg("-conf").arg(&files.corefile);
        self.spawn_node("coredns", coredns)?;

        self.wait_for(
            "the real node to be Ready",
            Duration::from_secs(120),
            || {
                self.kubectl_ok(&[
                    "get",
                    "node",
                    node::NODE_NAME,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .is_ok_and(|s| s.trim() == "True")
            },
        )?;
        eprintln!(
            "[harness] real node {} Ready in {:.1}s (region {}, pods on {})",
            node::NODE_NAME,
            started.elapsed().as_secs_f64(),
            node::NODE_REGION,
            node::POD_SUBNET
        );
        Ok(())
    }

    /// Starts a node agent: its log in `logs/<name>.log`, its pid where the node's
    /// teardown finds it.
    fn spawn_node(&self, name: &str, cmd: Command) -> anyhow::Result<()> {
        let child = self.start_logged_as(name, cmd, false)?;
        node::record_pid(name, child.id())?;
        self.children
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(Component {
                name: name.to_owned(),
                args: Vec::new(),
                child,
                restarts: 0,
            });
        Ok(())
    }

    /// Imports an image archive (OCI or Docker) into the real node's containerd.
    pub fn import_image(&self, archive: &Path) -> anyhow::Result<()> {
        let node_bins = self
            .node
            .as_ref()
            .context("this cluster has no real node to import images into")?;
        node::import_image(node_bins, archive)
    }

    /// What a person debugging a failure looks at first: every pod with its node and
    /// state, and the latest events.
    pub fn diagnose(&self) -> String {
        let pods = self
            .kubectl_ok(&["get", "pods", "-A", "-o", "wide"])
            .unwrap_or_else(|e| e.to_string());
        let events = self
            .kubectl_ok(&["get", "events", "-A", "--sort-by=.lastTimestamp"])
            .unwrap_or_else(|e| e.to_string());
        let events: Vec<&str> = events.lines().collect();
        let tail = events[events.len().saturating_sub(25)..].join("\n");
        format!(
            "pods:\n{pods}\nlatest events:\n{tail}\nlogs (containers' under pods/): {}",
            self.logs_dir().display()
        )
    }

    fn write_kubeconfig(&self) -> anyhow::Result<()> {
        let text = kubeconfig_text(
            &self.server,
            &self.dir.join("ca.crt"),
            &self.dir.join("admin.crt"),
            &self.dir.join("admin.key"),
        );
        std::fs::write(&self.kubeconfig, text).context("writing the kubeconfig")?;
        Ok(())
    }

    fn spawn(&self, name: &str, args: &[String]) -> anyhow::Result<()> {
        let mut cmd = Command::new(self.bins.path(name));
        cmd.args(args);
        let child = self.start_logged(name, cmd)?;
        self.children
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(Component {
                name: name.to_owned(),
                args: args.to_vec(),
                child,
                restarts: 0,
            });
        Ok(())
    }

    /// Starts an exited component again, as the kubelet would: its old log is kept as
    /// `<name>.<n>.log` and quoted on stderr, and a `--secure-port` or
    /// `--server-address` port is chosen afresh in case the old one was taken.
    fn restart(&self, c: &mut Component, status: std::process::ExitStatus) -> anyhow::Result<()> {
        c.restarts += 1;
        let logs = self.logs_dir();
        let old = logs.join(format!("{}.{}.log", c.name, c.restarts));
        let _ = std::fs::rename(logs.join(format!("{}.log", c.name)), &old);
        eprintln!(
            "[harness] {} exited ({status}); starting it again ({}/{MAX_RESTARTS}). The end of its log ({}):\n{}",
            c.name,
            c.restarts,
            old.display(),
            log_tail(&old)
        );
        for arg in &mut c.args {
            if arg.starts_with("--secure-port=") {
                *arg = format!("--secure-port={}", free_port()?);
            } else if arg.starts_with("--server-address=127.0.0.1:") {
                *arg = format!("--server-address=127.0.0.1:{}", free_port()?);
            }
        }
        let mut cmd = Command::new(self.bins.path(&c.name));
        cmd.args(&c.args);
        c.child = self.start_logged(&c.name, cmd)?;
        Ok(())
    }

    /// Starts `cmd` with its output in `logs/<name>.log` and its pid registered with the
    /// reaper.
    fn start_logged(&self, name: &str, cmd: Command) -> anyhow::Result<Child> {
        self.start_logged_as(name, cmd, true)
    }

    fn start_logged_as(
        &self,
        name: &str,
        mut cmd: Command,
        reaper_stops_it: bool,
    ) -> anyhow::Result<Child> {
        let log = File::create(self.logs_dir().join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        if !reaper_stops_it {
            return Ok(child);
        }
        let mut pids = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("pids"))?;
        writeln!(pids, "{}", child.id())?;
        Ok(child)
    }

    /// Starts a process of the project (an operator, a gateway) against this cluster:
    /// `KUBECONFIG` points at it as admin unless `cmd` sets its own, output goes to
    /// `logs/<name>.log`, and the reaper stops it with the cluster.
    pub fn spawn_process(&self, name: &str, mut cmd: Command) -> anyhow::Result<Child> {
        if !cmd.get_envs().any(|(k, _)| k == "KUBECONFIG") {
            cmd.env("KUBECONFIG", &self.kubeconfig);
        }
        self.start_logged(name, cmd)
    }

    /// Polls `ready` until it holds, failing early (with the log to read) if a component
    /// exits.
    fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return Ok(());
            }
            if let Some((name, status)) = self.exited_component()? {
                let log = self.logs_dir().join(format!("{name}.log"));
                bail!(
                    "{name} exited ({status}) while waiting for {what}; see {}. Its last lines:\n{}",
                    log.display(),
                    log_tail(&log)
                );
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The first component that exited and may not be started again; restartable ones
    /// that exited are started again on the way.
    fn exited_component(&self) -> anyhow::Result<Option<(String, std::process::ExitStatus)>> {
        let mut children = self
            .children
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        for c in children.iter_mut() {
            let Some(status) = c.child.try_wait().ok().flatten() else {
                continue;
            };
            if RESTARTABLE.contains(&c.name.as_str()) && c.restarts < MAX_RESTARTS {
                self.restart(c, status)?;
                continue;
            }
            return Ok(Some((c.name.clone(), status)));
        }
        Ok(None)
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig that impersonates `user` (with `groups`), for running a component
    /// under exactly the identity it would have in a pod, e.g. a ServiceAccount.
    pub fn kubeconfig_as(&self, user: &str, groups: &[&str]) -> anyhow::Result<PathBuf> {
        let base = std::fs::read_to_string(&self.kubeconfig)?;
        let mut impersonation = format!("    as: {user}\n");
        if !groups.is_empty() {
            impersonation.push_str("    as-groups:\n");
            for g in groups {
                impersonation.push_str(&format!("    - {g}\n"));
            }
        }
        let text = base.replace(
            "    client-key: ",
            &format!("{impersonation}    client-key: "),
        );
        let n = self.namespaces.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.join(format!("kubeconfig-as-{n}"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// The process id of a running component (`kube-controller-manager`, say).
    pub fn component_pid(&self, name: &str) -> Option<u32> {
        let children = self.children.lock().ok()?;
        children
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.child.id())
    }

    /// Where each component writes its log (`<component>.log`).
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// The control-plane binaries (also kubectl and helm of the same release).
    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// Keeps the cluster directory and its logs after the run.
    pub fn keep_logs(&self) {
        let _ = std::fs::write(self.dir.join("keep"), b"");
    }

    /// kubectl of the cluster's release, pointed at the cluster as admin.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bins.path("kubectl"));
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs kubectl and returns its stdout, or an error holding its stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .kubectl()
            .args(args)
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One object's fields through a JSONPath template: `get("pod/x", "ns", "{.status.phase}")`.
    pub fn get(&self, object: &str, namespace: &str, jsonpath: &str) -> anyhow::Result<String> {
        self.kubectl_ok(&[
            "get",
            object,
            "-n",
            namespace,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ])
    }

    /// The names of the `kind` objects in `namespace` matching the label `selector`.
    pub fn names(&self, kind: &str, namespace: &str, selector: &str) -> Vec<String> {
        self.kubectl_ok(&[
            "get",
            kind,
            "-n",
            namespace,
            "-l",
            selector,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
    }

    /// Runs kubectl with `input` on stdin; returns (success, stdout, stderr).
    pub fn kubectl_input(
        &self,
        args: &[&str],
        input: &str,
    ) -> anyhow::Result<(bool, String, String)> {
        let mut child = self
            .kubectl()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn kubectl_stdin(&self, args: &[&str], input: &str) -> anyhow::Result<String> {
        let (ok, stdout, stderr) = self.kubectl_input(args, input)?;
        if !ok {
            bail!("kubectl {} failed: {}", args.join(" "), stderr.trim());
        }
        Ok(stdout)
    }

    /// helm of the pinned release, pointed at the cluster.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(self.bins.path("helm"));
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"))
            .stdin(Stdio::null());
        cmd
    }

    /// A kube client for the current tokio runtime, as admin.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A fresh namespace named `<prefix>-<n>`, deleted when the guard drops (kept, with
    /// the logs, when the test panicked).
    pub fn namespace(&self, prefix: &str) -> anyhow::Result<TestNamespace<'_>> {
        let n = self.namespaces.fetch_add(1, Ordering::SeqCst);
        let name = format!("{prefix}-{n}");
        self.kubectl_ok(&["create", "namespace", &name])?;
        self.wait_for(
            "the namespace's default ServiceAccount",
            Duration::from_secs(30),
            || {
                self.kubectl_ok(&["get", "serviceaccount", "default", "-n", &name])
                    .is_ok()
            },
        )?;
        Ok(TestNamespace {
            cluster: self,
            name,
        })
    }

    /// Stops every component and removes the directory (unless logs are kept).
    pub fn stop(&self) {
        // The node goes first (pods, agents, host state), while the API server still
        // answers; the reaper runs the same teardown again, which finds nothing. Only a
        // cluster whose reaper holds the node lock may: otherwise the node on this machine
        // is another cluster's.
        if self.node.is_some()
            && self.dir.join("node-locked").exists()
            && let Err(e) = node::teardown()
        {
            eprintln!("[harness] the real node's teardown failed: {e:#}");
        }
        if let Ok(mut children) = self.children.lock() {
            for c in children.iter_mut().rev() {
                let _ = c.child.kill();
                let _ = c.child.wait();
            }
            children.clear();
        }
        let keep = self.dir.join("keep").exists() || std::thread::panicking();
        if keep {
            self.keep_logs();
            eprintln!(
                "[harness] control plane logs kept in {}",
                self.logs_dir().display()
            );
        }
        let _ = std::fs::write(self.dir.join("stopped"), b"");
        if let Ok(mut reaper) = self.reaper.lock()
            && let Some(mut reaper) = reaper.take()
        {
            let _ = reaper.wait();
        }
        if keep {
            // The logs are what a failure needs; etcd's data (Secrets) and the CA's key
            // must not outlive the cluster.
            if let Ok(entries) = std::fs::read_dir(&self.dir) {
                for e in entries.flatten().filter(|e| e.file_name() != "logs") {
                    let path = e.path();
                    let _ = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A namespace for one test.
#[derive(Debug)]
pub struct TestNamespace<'a> {
    cluster: &'a Cluster,
    name: String,
}

impl TestNamespace<'_> {
    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.cluster.keep_logs();
            eprintln!(
                "[harness] test in namespace {} failed; control plane logs kept in {} (kubeconfig {})",
                self.name,
                self.cluster.logs_dir().display(),
                self.cluster.kubeconfig().display()
            );
            return;
        }
        let _ = self
            .cluster
            .kubectl_ok(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// A kubeconfig for `server` with a client certificate. `kubeconfig_as` relies on its
/// `client-key:` line; CoreDNS on the context name.
pub(crate) fn kubeconfig_text(server: &str, ca: &Path, crt: &Path, key: &Path) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: switchyard-local\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: client\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: switchyard-local\n  context: {{cluster: switchyard-local, user: client, namespace: default}}\ncurrent-context: switchyard-local\n",
        ca = ca.display(),
        crt = crt.display(),
        key = key.display(),
    )
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// The last lines of a log, indented, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    lines[start..]
        .iter()
        .map(|l| format!("    {}", l.chars().take(400).collect::<String>()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn http_get_contains(port: u16, path: &str, needle: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.contains(needle)
}

/// One kwok node per (region, zone), labelled like a cloud provider labels them, each
/// with room for the bench's 1000-pool run (a gateway requests 100m CPU and 128Mi); none in
/// `skip_region` (the real node's).
fn nodes_manifest(skip_region: Option<&str>) -> String {
    let mut out = String::new();
    for region in REGIONS.into_iter().filter(|r| Some(*r) != skip_region) {
        for zone in ZONES {
            let name = format!("kwok-{region}-{zone}");
            out.push_str(&format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations:\n    kwok.x-k8s.io/node: fake\n    node.alpha.kubernetes.io/ttl: \"0\"\n  labels:\n    type: kwok\n    kubernetes.io/hostname: {name}\n    kubernetes.io/os: linux\n    kubernetes.io/arch: amd64\n    topology.kubernetes.io/region: {region}\n    topology.kubernetes.io/zone: {region}-{zone}\nstatus:\n  allocatable: {{cpu: \"256\", memory: 1Ti, pods: \"1200\"}}\n  capacity: {{cpu: \"256\", memory: 1Ti, pods: \"1200\"}}\n"
            ));
        }
    }
    out
}
