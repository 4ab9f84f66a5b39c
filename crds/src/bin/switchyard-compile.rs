//! Shows what a region's gateways would be told: compiles ProviderPool and RoutingPolicy
//! manifests (a file or a directory) with the same `compile` the operator uses.
//!
//! ```text
//! cargo run -p crds --bin switchyard-compile -- examples/ --region us-east
//! ```
//! Prints the GatewayConfig as JSON on stdout; rejected policies and route conflicts go
//! to stderr, and make the exit status non-zero.

use std::path::PathBuf;
use std::process::ExitCode;

use kube::ResourceExt;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    let mut region = None;
    let mut namespace = "default".to_owned();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--region" => region = args.next(),
            "--namespace" | "-n" => namespace = args.next().unwrap_or(namespace),
            "-h" | "--help" => {
                println!("usage: switchyard-compile PATH --region REGION [--namespace NS]");
                return ExitCode::SUCCESS;
            }
            other => path = Some(PathBuf::from(other)),
        }
    }
    let (Some(path), Some(region)) = (path, region) else {
        eprintln!("usage: switchyard-compile PATH --region REGION [--namespace NS]");
        return ExitCode::from(2);
    };
    let manifests = match crds::manifests::load(&path, &namespace) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("switchyard-compile: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(pool) = manifests.pools.first() else {
        eprintln!("switchyard-compile: no ProviderPool in {}", path.display());
        return ExitCode::FAILURE;
    };
    if manifests.pools.len() > 1 {
        eprintln!(
            "switchyard-compile: several ProviderPools found; compiling {}",
            pool.name_any()
        );
    }
    let compiled = match crds::compile(pool, &manifests.policies, &region) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchyard-compile: {e}");
            return ExitCode::FAILURE;
        }
    };
    match serde_json::to_string_pretty(&compiled.config) {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("switchyard-compile: {e}");
            return ExitCode::FAILURE;
        }
    }
    for rejection in &compiled.rejected {
        for error in &rejection.errors {
            eprintln!("RoutingPolicy {} rejected: {error}", rejection.policy);
        }
    }
    for conflict in &compiled.conflicts {
        eprintln!(
            "RoutingPolicy {} does not serve {:?}: the older RoutingPolicy {} claims it",
            conflict.loser, conflict.model, conflict.winner
        );
    }
    if compiled.rejected.is_empty() && compiled.conflicts.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
