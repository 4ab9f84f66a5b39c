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
use std::path::PathBuf;
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

fn say(text: &str) {
    println!("\n==> {text}");
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
fn python() -> anyhow::Result<PathBuf> {
    let venv = repo_root().join(".venv");
    let py = venv.join("bin/python");
    let has_sdk = Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_sdk {
        println!("    installing the openai SDK into .venv (once)");
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()?
            .success()
            && Command::new(&py)
                .args(["-m", "pip", "install", "-q", "-r"])
                .arg(repo_root().join("tests/gateway/requirements.txt"))
                .status()?
                .success();
        if !ok {
            bail!("could not install the openai SDK into {}", venv.display());
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

/// The ClusterIP of a Service.
fn cluster_ip(cluster: &Cluster, service: &str) -> anyhow::Result<String> {
    cluster.get(&format!("service/{service}"), NS, "{.spec.clusterIP}")
}

fn main() -> anyhow::Result<()> {
    let exit_at_end = std::env::args().any(|a| a == "--exit");
    let py = python()?;
    say(
        "building the operator and gateway images (images/build.sh: static binaries, buildah, no daemon)",
    );
    let built = images::build()?;
    let fake_bin = workspace_binary("fake-provider", "fake-provider")?;

    say(
        "starting the local control plane with a real node (the first run builds it from source: ~20 minutes)",
    );
    let cluster = Cluster::start_with(Options { real_node: true })?;
    let mut children: Vec<Child> = Vec::new();
    for archive in built.all() {
        cluster.import_image(archive)?;
    }
    print!(
        "{}",
        cluster.kubectl_ok(&["get", "nodes", "-L", "topology.kubernetes.io/region"])?
    );

    say("helm install switchyard charts/switchyard (the operator runs in pods on the real node)");
    let installed =
        images::install_chart(&cluster, &[NS]).map_err(|e| e.context(cluster.diagnose()))?;
    println!(
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
    say("starting fake providers standing in for the example pool's providers");
    for p in &mut pool.spec.providers {
        let port = free_port()?;
        let mut cmd = Command::new(&fake_bin);
        cmd.args(["--listen", &format!("{NODE_IP}:{port}"), "--name", &p.name]);
        children.push(cluster.spawn_process(&format!("fake-{}", p.name), cmd)?);
        println!(
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

    say(
        "kubectl apply -f examples/ (provider endpoints pointed at the fakes; every region's gateways on the real node)",
    );
    for file in [
        "00-namespace.yaml",
        "10-secrets.yaml",
        "30-routingpolicy.yaml",
    ] {
        print!(
            "{}",
            cluster.kubectl_ok(&["apply", "-f", &examples.join(file).display().to_string()])?
        );
    }
    pool.metadata.namespace = Some(NS.into());
    let (ok, out, err) =
        cluster.kubectl_input(&["apply", "-f", "-"], &serde_json::to_string(&pool)?)?;
    if !ok {
        bail!("applying the pool failed: {err}");
    }
    print!("{out}");

    say("an invalid manifest is refused by the API server");
    let bad = repo_root().join("examples/invalid/pool-azure-without-azure-block.yaml");
    let out = cluster
        .kubectl()
        .args(["apply", "-n", NS, "-f"])
        .arg(&bad)
        .output()?;
    println!("    {}", String::from_utf8_lossy(&out.stderr).trim());

    say("waiting for the operator to roll out a gateway Deployment per region (real containers)");
    wait_for("the pool to turn Ready", Duration::from_secs(180), || {
        pool_condition(&cluster, "Ready", "status").is_ok_and(|s| s == "True")
    })?;
    print!(
        "{}",
        cluster.kubectl_ok(&["get", "deployments,pods", "-n", NS, "-o", "wide"])?
    );

    let mut gateways = Vec::new();
    for region in REGIONS {
        let ip = cluster_ip(&cluster, &format!("chat-{region}"))?;
        gateways.push((region, format!("http://{ip}:8080/v1")));
    }
    say("each region's gateways answer on their Service (ClusterIP, routed by kube-proxy)");
    for (region, url) in &gateways {
        println!("    {region:<8} {url}  (chat-{region}.{NS}.svc.cluster.local from pods)");
    }
    let us_east = gateways[0].1.clone();
    let eu_west = gateways[2].1.clone();

    say("requests with the official openai SDK to the us-east gateways");
    client(&py, &us_east, "gpt-4o", 4)?;
    client(&py, &us_east, "gpt-4o-mini", 4)?;
    say("the same model from eu-west prefers the local Azure deployment");
    client(&py, &eu_west, "gpt-4o", 2)?;
    say("claude-sonnet is served by Anthropic's Messages API, translated both ways");
    client(&py, &us_east, "claude-sonnet", 2)?;

    std::thread::sleep(Duration::from_secs(4));
    say("kubectl get providerpools,routingpolicies -o wide");
    print!(
        "{}",
        cluster.kubectl_ok(&[
            "get",
            "providerpools,routingpolicies",
            "-o",
            "wide",
            "-n",
            NS
        ])?
    );

    say("taking OpenAI and Azure us-east down (503s and connection resets)");
    fault(fakes["openai"], "status:503")?;
    fault(fakes["azure-eastus"], "reset")?;
    client(&py, &us_east, "gpt-4o", 8)?;

    say("the failover shows in the pool status within seconds");
    wait_for(
        "the pool to report the ejections",
        Duration::from_secs(30),
        || {
            pool_condition(&cluster, "Degraded", "message")
                .is_ok_and(|m| m.contains("us-east/openai"))
        },
    )?;
    print!(
        "{}",
        cluster.kubectl_ok(&["get", "providerpools", "-o", "wide", "-n", NS])?
    );
    let status: Value = serde_json::from_str(&cluster.kubectl_ok(&[
        "get",
        "providerpool",
        "chat",
        "-n",
        NS,
        "-o",
        "json",
    ])?)?;
    for region in status["status"]["regions"].as_array().into_iter().flatten() {
        for p in region["providers"].as_array().into_iter().flatten() {
            println!(
                "    {:<8} {:<18} {:<9} {}",
                region["name"].as_str().unwrap_or_default(),
                p["name"].as_str().unwrap_or_default(),
                p["state"].as_str().unwrap_or_default(),
                p["reason"].as_str().unwrap_or_default()
            );
        }
    }

    println!();
    if !exit_at_end {
        println!(
            "Point kubectl at the cluster:  export KUBECONFIG={}",
            cluster.kubeconfig().display()
        );
        println!(
            "                                {} get providerpools,pods -n {NS} -o wide",
            cluster.binaries().path("kubectl").display()
        );
        println!(
            "Send your own requests:        OPENAI_BASE_URL={us_east} OPENAI_API_KEY={CLIENT_KEY} ..."
        );
        println!(
            "Component and container logs:  {}",
            cluster.logs_dir().display()
        );
        println!("Everything stays up until Ctrl-C.");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    }
    say("tearing down (pods, the node, the control plane)");
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(cluster);
    Ok(())
}
