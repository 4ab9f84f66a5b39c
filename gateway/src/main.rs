//! `switchyard-gateway`: an OpenAI-compatible gateway with health-aware routing and
//! failover.
//!
//! ```text
//! switchyard-gateway --manifests examples/ --region us-east [--listen 0.0.0.0:8080]
//! ```
//!
//! Standalone mode reads ProviderPool, RoutingPolicy and Secret manifests (what a user
//! would `kubectl apply`), compiles them with the operator's `compile`, and reloads them
//! when they change. In-cluster mode (`--configmap NAME --namespace NS`, what the
//! operator's Deployments run) watches the operator's ConfigMap and the Secrets it
//! references through the API (in-cluster credentials, or `KUBECONFIG`), and publishes
//! provider health into the pool's status.

mod auth;
mod body;
mod budget;
mod cluster;
mod errors;
mod gateway;
mod health;
mod idempotency;
mod metrics;
mod probe;
mod proxy;
mod retry;
mod select;
mod server;
mod source;
mod sse;
mod table;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::gateway::Gateway;
use crate::source::ManifestSource;

const USAGE: &str = "usage: switchyard-gateway (--manifests PATH | --configmap NAME) --region REGION [--namespace NS] \
[--pool NAME] [--listen ADDR] [--admin-listen ADDR] [--max-body-bytes N] [--max-connections N] [--header-timeout-seconds N] [--body-timeout-seconds N] [--memory-budget-bytes N] [--upstream-idle-timeout-seconds N] [--idempotency-max-bytes N] [--ca-file PEM] [--shutdown-delay-seconds N] [--drain-seconds N] [--no-publish-health] [--log-format json|text]";

#[derive(Debug)]
struct Args {
    manifests: Option<PathBuf>,
    config_map: Option<String>,
    publish_health: bool,
    region: String,
    namespace: String,
    pool: Option<String>,
    listen: SocketAddr,
    admin_listen: Option<SocketAddr>,
    limits: gateway::ClientLimits,
    replay_bytes: usize,
    upstream_idle: Duration,
    ca_file: Option<PathBuf>,
    shutdown_delay: Duration,
    drain: Duration,
    json_logs: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut manifests = None;
    let mut config_map = None;
    let mut publish_health = true;
    let mut region = None;
    let mut namespace = "default".to_owned();
    let mut pool = None;
    let mut listen: SocketAddr = "0.0.0.0:8080".parse()?;
    let mut limits = gateway::ClientLimits::default();
    // Also from the environment, like the shutdown delay (see there).
    let mut admin_listen = match std::env::var("SWITCHYARD_ADMIN_LISTEN") {
        Ok(v) => Some(
            v.parse()
                .context("SWITCHYARD_ADMIN_LISTEN needs an address such as 0.0.0.0:9090")?,
        ),
        Err(_) => None,
    };
    let mut replay_bytes = 64 << 20;
    let mut upstream_idle = Duration::from_secs(90);
    let mut ca_file = None;
    // The operator sets the delay through the environment, which gateway images older
    // than the flag ignore instead of refusing to start.
    let mut shutdown_delay = match std::env::var("SWITCHYARD_SHUTDOWN_DELAY_SECONDS") {
        Ok(v) => Duration::from_secs(
            v.parse()
                .context("SWITCHYARD_SHUTDOWN_DELAY_SECONDS needs a number")?,
        ),
        Err(_) => Duration::ZERO,
    };
    let mut drain = Duration::from_secs(30);
    let mut json_logs = true;
    let mut args = flag_values(std::env::args().skip(1));
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--manifests" => manifests = Some(PathBuf::from(value()?)),
            "--configmap" => config_map = Some(value()?),
            "--no-publish-health" => publish_health = false,
            "--region" => region = Some(value()?),
            "--namespace" => namespace = value()?,
            "--pool" => pool = Some(value()?),
            "--listen" => {
                listen = value()?
                    .parse()
                    .context("--listen needs an address such as 127.0.0.1:8080")?
            }
            "--max-body-bytes" => {
                limits.max_body = value()?
                    .parse()
                    .context("--max-body-bytes needs a number")?
            }
            "--admin-listen" => {
                admin_listen = Some(
                    value()?
                        .parse()
                        .context("--admin-listen needs an address such as 0.0.0.0:9090")?,
                )
            }
            "--max-connections" => {
                limits.max_connections = value()?
                    .parse()
                    .context("--max-connections needs a number")?
            }
            "--header-timeout-seconds" => {
                limits.header_timeout = Duration::from_secs(
                    value()?
                        .parse()
                        .context("--header-timeout-seconds needs a number")?,
                )
            }
            "--body-timeout-seconds" => {
                limits.body_timeout = Duration::from_secs(
                    value()?
                        .parse()
                        .context("--body-timeout-seconds needs a number")?,
                )
            }
            "--upstream-idle-timeout-seconds" => {
                upstream_idle = Duration::from_secs(
                    value()?
                        .parse()
                        .context("--upstream-idle-timeout-seconds needs a number")?,
                )
            }
            "--memory-budget-bytes" => {
                limits.memory_budget = value()?
                    .parse()
                    .context("--memory-budget-bytes needs a number")?
            }
            "--idempotency-max-bytes" => {
                replay_bytes = value()?
                    .parse()
                    .context("--idempotency-max-bytes needs a number")?
            }
            "--ca-file" => ca_file = Some(PathBuf::from(value()?)),
            "--shutdown-delay-seconds" => {
                shutdown_delay = Duration::from_secs(
                    value()?
                        .parse()
                        .context("--shutdown-delay-seconds needs a number")?,
                )
            }
            "--drain-seconds" => {
                drain =
                    Duration::from_secs(value()?.parse().context("--drain-seconds needs a number")?)
            }
            "--log-format" => json_logs = value()? != "text",
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if limits.max_connections == 0
        || limits.header_timeout.is_zero()
        || limits.body_timeout.is_zero()
    {
        bail!("--max-connections and the timeouts must be at least 1\n{USAGE}");
    }
    // A body counts twice against the budget (as received and as sent upstream).
    if limits.memory_budget < limits.max_body.saturating_mul(2) {
        bail!(
            "--memory-budget-bytes must be at least twice --max-body-bytes ({}): a body counts as received and as sent upstream",
            limits.max_body
        );
    }
    if manifests.is_some() == config_map.is_some() {
        bail!("give exactly one of --manifests and --configmap\n{USAGE}");
    }
    let Some(region) = region else {
        bail!("--region is required\n{USAGE}")
    };
    Ok(Args {
        manifests,
        config_map,
        publish_health,
        region,
        namespace,
        pool,
        listen,
        admin_listen,
        limits,
        replay_bytes,
        upstream_idle,
        ca_file,
        shutdown_delay,
        drain,
        json_logs,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    return_large_buffers_to_the_system();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.json_logs {
        tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .with_current_span(false)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    }

    let mut gw = Gateway::new(
        args.region.clone(),
        args.limits,
        args.replay_bytes,
        upstream::tls_config(args.ca_file.as_deref())?,
    );
    gw.admin_on_api_port = args.admin_listen.is_none();
    gw.upstream_idle = args.upstream_idle;
    let gw = Arc::new(gw);
    if let Some(addr) = args.admin_listen {
        let admin = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--admin-listen)"))?;
        tracing::info!(listen = %admin.local_addr()?, "serving /metrics and /status");
        tokio::spawn(server::run_admin(gw.clone(), admin));
    }
    if let Some(path) = &args.manifests {
        let source = ManifestSource {
            path: path.clone(),
            region: args.region.clone(),
            namespace: args.namespace.clone(),
            pool: args.pool.clone(),
        };
        source
            .apply(&gw)
            .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", path.display()))?;
        tokio::spawn(source.watch(gw.clone()));
    }
    if let Some(name) = &args.config_map {
        let client = kube::Client::try_default()
            .await
            .context("cannot reach the Kubernetes API")?;
        let source = cluster::ClusterSource {
            client: client.clone(),
            namespace: args.namespace.clone(),
            config_map: name.clone(),
        };
        tokio::spawn(source.run(gw.clone()));
        if args.publish_health {
            tokio::spawn(cluster::publish_health(client, gw.clone()));
        }
        // /readyz stays false until the first config arrives; wait briefly so the open-auth
        // warning below sees it, without blocking start-up on a missing ConfigMap.
        for _ in 0..50 {
            if gw.table.load().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if let Some(table) = gw.table.load_full()
        && table
            .routes()
            .iter()
            .any(|r| r.config.client_auth_secret.is_none())
    {
        let open: Vec<&str> = table
            .routes()
            .iter()
            .filter(|r| r.config.client_auth_secret.is_none())
            .map(|r| r.config.model.as_str())
            .collect();
        tracing::warn!(
            models = ?open,
            "NO CLIENT AUTHENTICATION: these models accept requests from anyone who can reach this port; set spec.clientAuth on their RoutingPolicy"
        );
    }
    tokio::spawn(probe::run(gw.clone()));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    tracing::info!(listen = %local, region = %args.region, "serving the OpenAI API");
    // Launchers (tests, the demo) read the bound address from this line.
    println!("switchyard-gateway listening on http://{local}");

    let shutdown = server::Shutdown {
        delay: args.shutdown_delay,
        drain: args.drain,
    };
    server::run(gw, listener, shutdown_signal(), shutdown).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// Buffers of a few hundred KiB and more get pages of their own, given back to the
/// system when freed. Without this glibc raises its threshold after the first large
/// frees, so the next burst of big answers is served from the heap and stays resident
/// (790 MB after 20 oversized answers, in a test before this).
// The workspace denies unsafe code; this call is its one exception.
#[allow(unsafe_code)]
fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator and takes no pointers; glibc serialises it
    // with allocation, and a refused setting leaves the defaults.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Splits `--flag=value` into `--flag value`, so both spellings work (the chart uses the
/// first).
fn flag_values(args: impl Iterator<Item = String>) -> impl Iterator<Item = String> {
    args.flat_map(|a| match a.split_once('=') {
        Some((flag, value)) if flag.starts_with("--") => vec![flag.to_owned(), value.to_owned()],
        _ => vec![a],
    })
}
