//! The Switchyard demo on this machine: a real local control plane, the CRDs, the
//! examples, and what each region's gateways would be configured with.
//!
//! ```text
//! cargo run -p harness --bin switchyard-demo            # stays up until Ctrl-C
//! cargo run -p harness --bin switchyard-demo -- --exit  # tears down at the end
//! ```

use std::time::Duration;

use anyhow::Context;
use harness::{Cluster, REGIONS, repo_root};

fn main() -> anyhow::Result<()> {
    let exit_at_end = std::env::args().any(|a| a == "--exit");
    println!(
        "==> starting the local control plane (the first run builds it from source: ~15 minutes)"
    );
    let cluster = Cluster::start()?;
    let kubeconfig = cluster.kubeconfig().display().to_string();

    println!("==> installing the CRDs from charts/switchyard/crds");
    let crds = repo_root()
        .join("charts/switchyard/crds")
        .display()
        .to_string();
    print!(
        "{}",
        cluster.kubectl_ok(&["apply", "--server-side", "-f", &crds])?
    );
    cluster.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/providerpools.switchyard.dev",
        "crd/routingpolicies.switchyard.dev",
    ])?;

    println!("==> kubectl apply -f examples/");
    let examples = repo_root().join("examples");
    for file in [
        "00-namespace.yaml",
        "10-secrets.yaml",
        "20-providerpool.yaml",
        "30-routingpolicy.yaml",
    ] {
        print!(
            "{}",
            cluster.kubectl_ok(&["apply", "-f", &examples.join(file).display().to_string()])?
        );
    }

    println!("==> an invalid manifest is refused by the API server:");
    let bad = repo_root().join("examples/invalid/pool-azure-without-azure-block.yaml");
    let out = cluster
        .kubectl()
        .args(["apply", "-n", "ai-platform", "-f"])
        .arg(&bad)
        .output()?;
    println!(
        "    {}",
        String::from_utf8_lossy(&out.stderr)
            .trim()
            .replace('\n', "\n    ")
    );

    println!("==> kubectl get providerpools,routingpolicies -o wide -n ai-platform");
    print!(
        "{}",
        cluster.kubectl_ok(&[
            "get",
            "providerpools,routingpolicies",
            "-o",
            "wide",
            "-n",
            "ai-platform"
        ])?
    );

    println!("==> what each region's gateways are told (compile, as the operator will write it):");
    let manifests = crds::manifests::load(&examples, "default")?;
    let pool = manifests
        .pools
        .first()
        .context("the examples hold a ProviderPool")?;
    for region in REGIONS {
        let compiled = crds::compile(pool, &manifests.policies, region)?;
        println!("  region {region}:");
        for route in &compiled.config.routes {
            let targets: Vec<String> = route
                .targets
                .iter()
                .map(|t| format!("{}(tier {})", t.provider, t.tier))
                .collect();
            println!(
                "    {:<14} {:?} -> {}",
                route.model,
                route.strategy,
                targets.join(", ")
            );
        }
    }

    println!();
    println!("The operator and the gateway are not implemented yet, so READY and the status");
    println!("columns stay empty; see the README's status section.");
    println!();
    println!("Point kubectl at the cluster:  export KUBECONFIG={kubeconfig}");
    println!(
        "                                {} get nodes -L topology.kubernetes.io/region",
        cluster.binaries().path("kubectl").display()
    );
    if exit_at_end {
        return Ok(());
    }
    println!("The cluster stays up until Ctrl-C.");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    println!("==> tearing down");
    drop(cluster);
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}
