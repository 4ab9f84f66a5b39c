//! The Switchyard demo on this machine, end to end: a real local control plane with a
//! real node, the operator and gateway images built here, the Helm chart (the operator
//! runs in pods), gateway pods per region (real containers on the one real node, by a
//! per-region node selector), fake providers on the node's bridge standing in for OpenAI,
//! Azure, Anthropic and vLLM, and the official `openai` SDK as the client, talking to each
//! region's Service. Then a provider goes down and the failover shows in the answers and
//! in the status.
//!
//! ```text
//! cargo run -p harness --bin switchyard-demo            # stays up until Ctrl-C
//! cargo run -p harness --bin switchyard-demo -- --exit  # tears down at the end
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use harness::node::NODE_IP;
use harness::{Cluster, Options, REGIONS, images, repo_root, workspace_binary};
use serde_json::Value;

const NS: &str = "ai-platform";
const CLIENT_KEY: &str = "demo-client-key-checkout";

/// A free port on the node's bridge, where gateway pods reach the fake providers.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((NODE_IP, 0))?.local_addr()?.port())
}

/// Writes a line to stdout, ignoring a closed pipe: with `| tee`, Ctrl-C takes `tee` down
/// first, and the teardown that follows must still run (a panic here would keep the
/// cluster directory for inspection).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Writes text as it is (kubectl's tables end with their own newline).
fn show(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

/// The demo's phases: one line each, with the time since the demo started, and a line
/// when one has run for 25 s without a word.
struct Phases {
    started: Instant,
    current: std::sync::Arc<std::sync::Mutex<(String, Instant)>>,
}

impl Phases {
    fn new(details: PathBuf) -> Self {
        let started = Instant::now();
        let current = std::sync::Arc::new(std::sync::Mutex::new((String::new(), started)));
        let watched = current.clone();
        std::thread::spawn(move || {
            let mut last_word = Instant::now();
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let Ok(now) = watched.lock().map(|c| c.clone()) else {
                    return;
                };
                let (phase, since) = now;
                last_word = last_word.max(since);
                if !phase.is_empty() && last_word.elapsed() >= Duration::from_secs(25) {
                    out!(
                        "    ... still running ({}; details in {})",
                        clock(since.elapsed()),
                        details.display()
                    );
                    last_word = Instant::now();
                }
            }
        });
        Self { started, current }
    }

    /// No phase runs (the demo waits for Ctrl-C): nothing to report.
    fn rest(&self) {
        if let Ok(mut c) = self.current.lock() {
            c.0.clear();
        }
    }

    fn say(&self, text: &str) {
        out!("\n==> [{}] {text}", clock(self.started.elapsed()));
        if let Ok(mut c) = self.current.lock() {
            *c = (text.to_owned(), Instant::now());
        }
    }
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

/// A field (`status`, `message`, ...) of one of the demo pool's conditions.
fn pool_condition(cluster: &Cluster, type_: &str, field: &str) -> anyhow::Result<String> {
    cluster.get(
        "providerpool/chat",
        NS,
        &format!("{{.status.conditions[?(@.type==\"{type_}\")].{field}}}"),
    )
}

/// The Python with the openai SDK: the repo's .venv, created if missing.
fn python(details: &Path) -> anyhow::Result<PathBuf> {
    let venv = repo_root().join(".venv");
    let py = venv.join("bin/python");
    let has_sdk = Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_sdk {
        out!("    installing the openai SDK into .venv (once)");
        let log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(details)
        };
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .stdout(log()?)
            .stderr(log()?)
            .status()?
            .success()
            && Command::new(&py)
                .args(["-m", "pip", "install", "-q", "-r"])
                .arg(repo_root().join("tests/gateway/requirements.txt"))
                .stdout(log()?)
                .stderr(log()?)
                .status()?
                .success();
        if !ok {
            bail!(
                "could not install the openai SDK into {} (on Debian, python3 -m venv needs: apt install python3-venv)",
                venv.display()
            );
        }
    }
    Ok(py)
}

fn client(py: &PathBuf, base_url: &str, model: &str, count: u32) -> anyhow::Result<()> {
    let status = Command::new(py)
        .arg(repo_root().join("tests/demo/client.py"))
        .args([base_url, CLIENT_KEY, model, &count.to_string()])
        .status()?;
    if !status.success() {
        bail!("the openai client failed");
    }
    Ok(())
}

fn fault(port: u16, spec: &str) -> anyhow::Result<()> {
    let out = Command::new("curl")
        .args([
            "-sf",
            "-XPOST",
            &format!("http://{NODE_IP}:{port}/admin/faults"),
            "-d",
            &format!("{{\"fault\":\"{spec}\"}}"),
        ])
        .output()?;
    if !out.status.success() {
        bail!("could not set a fault on the fake provider at port {port}");
    }
    Ok(())
}

/// Each provider's health in each region, as the gateways published it in the pool's
/// status: one row per provider, one column per region.
fn health_table(status: &Value) {
    let regions: Vec<&Value> = status["status"]["regions"]
        .as_array()
        .map(|r| r.iter().collect())
        .unwrap_or_default();
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut untouched = false;
    for (i, region) in regions.iter().enumerate() {
        for p in region["providers"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or_default().to_owned();
            let (state, reason) = (
                p["state"].as_str().unwrap_or_default(),
                p["reason"].as_str().unwrap_or_default(),
            );
            let cell = match (state, reason) {
                ("Unknown", "NoTrafficYet") => {
                    untouched = true;
                    "-".to_owned()
                }
                (state, "") => state.to_owned(),
                (state, reason) if state == reason => state.to_owned(),
                (state, reason) => format!("{state} ({reason})"),
            };
            let row = match rows.iter().position(|(n, _)| *n == name) {
                Some(at) => at,
                None => {
                    rows.push((name, vec!["-".to_owned(); regions.len()]));
                    rows.len() - 1
                }
            };
            rows[row].1[i] = cell;
        }
    }
    let width = 24;
    let mut header = format!("    {:<18}", "PROVIDER");
    for r in &regions {
        header.push_str(&format!(
            " {:<width$}",
            r["name"].as_str().unwrap_or_default()
        ));
    }
    out!("{}", header.trim_end());
    for (name, cells) in rows {
        let mut line = format!("    {name:<18}");
        for c in cells {
            line.push_str(&format!(" {c:<width$}"));
        }
        out!("{}", line.trim_end());
    }
    if untouched {
        out!("    - : no request has reached that provider from that region's gateways yet");
    }
}

/// The ClusterIP of a Service.
fn cluster_ip(cluster: &Cluster, service: &str) -> anyhow::Result<String> {
    cluster.get(&format!("service/{service}"), NS, "{.spec.clusterIP}")
}

fn run(phases: &Phases, details: &Path, exit_at_end: bool) -> anyhow::Result<()> {
    let py = python(details)?;
    phases.say(
        "building the operator and gateway images (images/build.sh: static binaries, buildah, no daemon)",
    );
    let built = images::build()?;
    let fake_bin = workspace_binary("fake-provider", "fake-provider")?;

    phases.say(
        "starting the local control plane with a real node (the first run builds it from source: ~20 minutes)",
    );
    let cluster = Cluster::start_with(Options { real_node: true })?;
    let mut children: Vec<Child> = Vec::new();
    for archive in built.all() {
        cluster.import_image(archive)?;
    }
    show(&cluster.kubectl_ok(&["get", "nodes", "-L", "topology.kubernetes.io/region"])?);

    phases.say(
        "helm install switchyard charts/switchyard (the operator runs in pods on the real node)",
    );
    let installed =
        images::install_chart(&cluster, &[NS]).map_err(|e| e.context(cluster.diagnose()))?;
    out!(
        "{}",
        installed.lines().take(6).collect::<Vec<_>>().join("\n")
    );

    // Every provider of the example pool gets a fake on the node's bridge, where gateway
    // pods reach it; nothing leaves this machine.
    let examples = repo_root().join("examples");
    let manifests = crds::manifests::load(&examples, NS)?;
    let mut pool = manifests
        .pools
        .first()
        .context("the examples hold a ProviderPool")?
        .clone();
    let mut fakes = std::collections::BTreeMap::new();
    phases.say("starting fake providers standing in for the example pool's providers");
    for p in &mut pool.spec.providers {
        let port = free_port()?;
        let mut cmd = Command::new(&fake_bin);
        cmd.args(["--listen", &format!("{NODE_IP}:{port}"), "--name", &p.name]);
        children.push(cluster.spawn_process(&format!("fake-{}", p.name), cmd)?);
        out!(
            "    {:<18} {:<17} {} -> http://{NODE_IP}:{port}",
            p.name,
            p.provider_type.as_str(),
            p.endpoint
        );
        p.endpoint = format!("http://{NODE_IP}:{port}");
        fakes.insert(p.name.clone(), port);
    }
    // One real node: every region's gateways are pinned to it instead of to nodes labelled
    // with the region (kwok nodes, which run nothing).
    for region in &mut pool.spec.regions {
        region.node_selector = Some(std::collections::BTreeMap::from([(
            "switchyard.dev/node".to_owned(),
            "real".to_owned(),
        )]));
    }

    phases.say(
        "kubectl apply -f examples/ (provider endpoints pointed at the fakes; every region's gateways on the real node)",
    );
    for file in [
        "00-namespace.yaml",
        "10-secrets.yaml",
        "30-routingpolicy.yaml",
    ] {
        show(&cluster.kubectl_ok(&["apply", "-f", &examples.join(file).display().to_string()])?);
    }
    pool.metadata.namespace = Some(NS.into());
    let (ok, out, err) =
        cluster.kubectl_input(&["apply", "-f", "-"], &serde_json::to_string(&pool)?)?;
    if !ok {
        bail!("applying the pool failed: {err}");
    }
    show(&out);

    phases.say("an invalid manifest is refused by the API server");
    let bad = repo_root().join("examples/invalid/pool-azure-without-azure-block.yaml");
    let out = cluster
        .kubectl()
        .args(["apply", "-n", NS, "-f"])
        .arg(&bad)
        .output()?;
    out!("    {}", String::from_utf8_lossy(&out.stderr).trim());

    phases.say(
        "waiting for the operator to roll out a gateway Deployment per region (real containers)",
    );
    wait_for("the pool to turn Ready", Duration::from_secs(180), || {
        pool_condition(&cluster, "Ready", "status").is_ok_and(|s| s == "True")
    })?;
    show(&cluster.kubectl_ok(&["get", "deployments,pods", "-n", NS, "-o", "wide"])?);

    let mut gateways = Vec::new();
    for region in REGIONS {
        let ip = cluster_ip(&cluster, &format!("chat-{region}"))?;
        gateways.push((region, format!("http://{ip}:8080/v1")));
    }
    phases.say("each region's gateways answer on their Service (ClusterIP, routed by kube-proxy)");
    for (region, url) in &gateways {
        out!("    {region:<8} {url}  (chat-{region}.{NS}.svc.cluster.local from pods)");
    }
    let us_east = gateways[0].1.clone();
    let eu_west = gateways[2].1.clone();

    phases.say("requests with the official openai SDK to the us-east gateways");
    client(&py, &us_east, "gpt-4o", 4)?;
    client(&py, &us_east, "gpt-4o-mini", 4)?;
    phases.say("the same model from eu-west prefers the local Azure deployment");
    client(&py, &eu_west, "gpt-4o", 2)?;
    phases.say("claude-sonnet is served by Anthropic's Messages API, translated both ways");
    client(&py, &us_east, "claude-sonnet", 2)?;

    std::thread::sleep(Duration::from_secs(4));
    phases.say("kubectl get providerpools,routingpolicies -o wide");
    show(&cluster.kubectl_ok(&[
        "get",
        "providerpools,routingpolicies",
        "-o",
        "wide",
        "-n",
        NS,
    ])?);
    out!(
        "    PROVIDERS counts providers healthy in at least one region, of those enabled; a provider\n    no request has reached yet counts as not healthy, so a fresh pool starts below the total."
    );

    phases.say("taking OpenAI and Azure us-east down (503s and connection resets)");
    fault(fakes["openai"], "status:503")?;
    fault(fakes["azure-eastus"], "reset")?;
    client(&py, &us_east, "gpt-4o", 8)?;
    phases.say(
        "gpt-4o-mini too: health is kept per provider and model, so OpenAI's gpt-4o-mini has to fail on its own",
    );
    client(&py, &us_east, "gpt-4o-mini", 8)?;

    phases.say("the failover shows in the pool status within seconds");
    wait_for(
        "the pool to report the ejections",
        Duration::from_secs(30),
        || {
            pool_condition(&cluster, "Degraded", "message")
                .is_ok_and(|m| m.contains("us-east/azure-eastus"))
        },
    )?;
    show(&cluster.kubectl_ok(&["get", "providerpools", "-o", "wide", "-n", NS])?);
    let status: Value = serde_json::from_str(&cluster.kubectl_ok(&[
        "get",
        "providerpool",
        "chat",
        "-n",
        NS,
        "-o",
        "json",
    ])?)?;
    health_table(&status);

    out!();
    if !exit_at_end {
        out!(
            "Point kubectl at the cluster:  export KUBECONFIG={}",
            cluster.kubeconfig().display()
        );
        out!(
            "                                {} get providerpools,pods -n {NS} -o wide",
            cluster.binaries().path("kubectl").display()
        );
        out!(
            "Send your own requests:        OPENAI_BASE_URL={us_east} OPENAI_API_KEY={CLIENT_KEY} ..."
        );
        out!(
            "Component and container logs:  {}",
            cluster.logs_dir().display()
        );
        out!("Everything stays up until Ctrl-C.");
        phases.rest();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    }
    phases.say("tearing down (pods, the node, the control plane)");
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(cluster);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let exit_at_end = std::env::args().any(|a| a == "--exit");
    let root = repo_root();
    let root = root.canonicalize().unwrap_or(root);
    let details = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("switchyard-demo.log");
    if let Some(dir) = details.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(&details, b"");
    harness::log_details_to(details.clone());
    let phases = Phases::new(details.clone());
    match run(&phases, &details, exit_at_end) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            out!(
                "\nThe demo failed: {e:#}\nWhat builds and installs printed: {}",
                details.display()
            );
            std::process::ExitCode::FAILURE
        }
    }
}
