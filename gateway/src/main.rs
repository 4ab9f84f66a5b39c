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

mod alloc;
mod auth;
mod body;
mod budget;
mod cluster;
mod dialect;
mod error;
mod gateway;
mod health;
mod idempotency;
mod metrics;
mod otel;
mod probe;
mod proxy;
mod response;
mod retry;
mod select;
mod server;
mod source;
mod sse;
mod table;
mod transitions;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, CommandFactory, Parser};

use crate::gateway::Gateway;
use crate::source::ManifestSource;

/// An OpenAI-compatible gateway with health-aware routing and failover across providers
/// and regions. Every option can also be set through the environment variable named
/// beside it.
#[derive(Debug, Parser)]
#[command(name = "switchyard-gateway", version, about, args_override_self = true)]
#[command(group(ArgGroup::new("source").required(true).args(["manifests", "configmap"])))]
struct Args {
    /// Standalone: a file or directory of ProviderPool, RoutingPolicy and Secret
    /// manifests, reloaded when it changes.
    #[arg(long, env = "SWITCHYARD_MANIFESTS", value_name = "PATH")]
    manifests: Option<PathBuf>,
    /// In a cluster: the operator's ConfigMap for this region, watched through the API.
    #[arg(long, env = "SWITCHYARD_CONFIGMAP", value_name = "NAME")]
    configmap: Option<String>,
    /// The region this gateway serves.
    #[arg(long, env = "SWITCHYARD_REGION")]
    region: String,
    /// Namespace of the ConfigMap, or of the manifests' objects.
    #[arg(long, env = "SWITCHYARD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// With --manifests: which ProviderPool to serve, when they hold several.
    #[arg(long, env = "SWITCHYARD_POOL", value_name = "NAME")]
    pool: Option<String>,
    /// Serving threads, each with its own runtime and listener (`SO_REUSEPORT`); the
    /// default is one per CPU the process may use.
    #[arg(long, env = "SWITCHYARD_WORKERS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: Option<u16>,
    /// Where to serve the OpenAI API.
    #[arg(
        long,
        env = "SWITCHYARD_LISTEN",
        default_value = "0.0.0.0:8080",
        value_name = "ADDR"
    )]
    listen: SocketAddr,
    /// Serve /metrics and /status here instead of on the API port (which then answers 404
    /// for them).
    #[arg(long, env = "SWITCHYARD_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Largest request body; a larger declared Content-Length is refused unread.
    #[arg(long, env = "SWITCHYARD_MAX_BODY_BYTES", default_value_t = 16 << 20, value_name = "N")]
    max_body_bytes: usize,
    /// Open client connections; beyond them a connection gets a 503 and is closed.
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS", default_value_t = 4096, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Time for a request's headers to arrive; also the idle keep-alive timeout.
    #[arg(long, env = "SWITCHYARD_HEADER_TIMEOUT_SECONDS", default_value_t = 30, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout_seconds: u64,
    /// Time for a request's whole body to arrive once its headers have.
    #[arg(long, env = "SWITCHYARD_BODY_TIMEOUT_SECONDS", default_value_t = 60, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    body_timeout_seconds: u64,
    /// Bytes all requests together may hold buffered (bodies, answers, replays); at least
    /// twice --max-body-bytes.
    #[arg(long, env = "SWITCHYARD_MEMORY_BUDGET_BYTES", default_value_t = 256 << 20, value_name = "N")]
    memory_budget_bytes: usize,
    /// How long an idle upstream connection is kept for reuse.
    #[arg(
        long,
        env = "SWITCHYARD_UPSTREAM_IDLE_TIMEOUT_SECONDS",
        default_value_t = 90,
        value_name = "N"
    )]
    upstream_idle_timeout_seconds: u64,
    /// Bytes of answers kept for Idempotency-Key replay.
    #[arg(long, env = "SWITCHYARD_IDEMPOTENCY_MAX_BYTES", default_value_t = 64 << 20, value_name = "N")]
    idempotency_max_bytes: usize,
    /// PEM certificates of private CAs that providers' certificates may chain to, trusted
    /// besides the web PKI roots.
    #[arg(long, env = "SWITCHYARD_CA_FILE", value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// On SIGTERM, keep accepting and serving this long (with /readyz failing) while
    /// endpoint removal reaches every proxy.
    #[arg(
        long,
        env = "SWITCHYARD_SHUTDOWN_DELAY_SECONDS",
        default_value_t = 0,
        value_name = "N"
    )]
    shutdown_delay_seconds: u64,
    /// Then stop accepting and finish requests in flight for at most this long.
    #[arg(
        long,
        env = "SWITCHYARD_DRAIN_SECONDS",
        default_value_t = 30,
        value_name = "N"
    )]
    drain_seconds: u64,
    /// In a cluster: do not publish provider health into the pool's status.
    #[arg(long, env = "SWITCHYARD_NO_PUBLISH_HEALTH")]
    no_publish_health: bool,
    /// Log lines as JSON (for log collectors) or as text.
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

impl Args {
    fn limits(&self) -> gateway::ClientLimits {
        gateway::ClientLimits {
            header_timeout: Duration::from_secs(self.header_timeout_seconds),
            body_timeout: Duration::from_secs(self.body_timeout_seconds),
            max_body: self.max_body_bytes,
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            memory_budget: self.memory_budget_bytes,
        }
    }
}

fn parse_args() -> Args {
    let args = Args::parse();
    // A body counts twice against the budget (as received and as sent upstream).
    if args.memory_budget_bytes < args.max_body_bytes.saturating_mul(2) {
        Args::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                format!(
                    "--memory-budget-bytes must be at least twice --max-body-bytes ({}): a body counts as received and as sent upstream",
                    args.max_body_bytes
                ),
            )
            .exit();
    }
    args
}

// Unit tests count allocations with an allocator of their own.
#[cfg(not(test))]
#[global_allocator]
static ALLOCATOR: alloc::BySize = alloc::BySize;

// Configuration, probes, health publishing and the admin port run here; requests are
// served by the threads `main` starts.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args();
    return_large_buffers_to_the_system();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_format == LogFormat::Json {
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

    let tls = upstream::tls_config(args.ca_file.as_deref())?;
    let mut gw = Gateway::new(
        args.region.clone(),
        args.limits(),
        args.idempotency_max_bytes,
        tls.clone(),
    );
    gw.tracing = otel::Tracing::from_env(tokio::runtime::Handle::current(), tls)?;
    gw.admin_on_api_port = args.admin_listen.is_none();
    gw.upstream_idle = Duration::from_secs(args.upstream_idle_timeout_seconds);
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
    if let Some(name) = &args.configmap {
        let client = kube::Client::try_default()
            .await
            .context("cannot reach the Kubernetes API")?;
        let source = cluster::ClusterSource {
            client: client.clone(),
            namespace: args.namespace.clone(),
            config_map: name.clone(),
        };
        tokio::spawn(source.run(gw.clone()));
        if !args.no_publish_health {
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
    tokio::spawn(transitions::run(gw.clone()));

    let workers = args.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        usize::from,
    );
    let listeners = server::bind_shared(args.listen, workers)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listeners[0].local_addr()?;
    tracing::info!(listen = %local, region = %args.region, workers, "serving the OpenAI API");
    // Launchers (tests, the demo) read the bound address from this line.
    println!("switchyard-gateway listening on http://{local}");

    let shutdown = server::Shutdown {
        delay: Duration::from_secs(args.shutdown_delay_seconds),
        drain: Duration::from_secs(args.drain_seconds),
    };
    let connections = Arc::new(tokio::sync::Semaphore::new(gw.limits.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut threads = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let (gw, connections, mut stop) = (gw.clone(), connections.clone(), stop_rx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("serve-{i}"))
            .spawn(move || -> anyhow::Result<()> {
                // One single-threaded runtime per core: a request, its upstream
                // connection and its stream stay on one thread, with no cross-thread
                // wake-ups (the cost a shared multi-threaded runtime adds per request).
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let signal = async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    };
                    server::run(gw, listener, connections, signal, shutdown).await;
                    Ok(())
                })
            })?;
        threads.push(thread);
    }
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    tokio::task::spawn_blocking(move || {
        for thread in threads {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "a serving thread failed"),
                Err(_) => tracing::error!("a serving thread panicked"),
            }
        }
    })
    .await?;
    // Spans of the last requests are still queued; the export runs on this runtime, so
    // wait for it from another thread.
    let tracing_gw = gw.clone();
    tokio::task::spawn_blocking(move || tracing_gw.tracing.shutdown()).await?;
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

/// Buffers of `alloc::LARGE` and more, which the system allocator serves, get pages of
/// their own, given back to the system when freed. Without this glibc raises its
/// threshold after the first large frees, so the next burst of big answers is served from
/// the heap and stays resident (790 MB after 20 oversized answers, in a test before this).
// The workspace denies unsafe code; this call and the allocator are its exceptions.
#[allow(unsafe_code)]
fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator and takes no pointers; glibc serialises it
    // with allocation, and a refused setting leaves the defaults.
    unsafe {
        libc::mallopt(
            libc::M_MMAP_THRESHOLD,
            i32::try_from(alloc::LARGE).unwrap_or(i32::MAX),
        );
    }
}
