//! `switchyard-operator`: runs the controllers under a leader lease and serves
//! `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::CustomResourceExt;
use switchyard_operator::events;
use switchyard_operator::leader::{self, LeaderElection};
use switchyard_operator::metrics::Metrics;
use switchyard_operator::watches;

/// The Switchyard operator: reconciles ProviderPools and RoutingPolicies into regional
/// gateway Deployments, ConfigMaps and Services. Every option can also be set through
/// the environment variable named beside it.
#[derive(Debug, Parser)]
#[command(
    name = "switchyard-operator",
    version,
    about,
    args_override_self = true
)]
struct Args {
    /// Gateway image for pools that name none.
    #[arg(long, env = "SWITCHYARD_GATEWAY_IMAGE", value_name = "IMAGE",
          default_value = concat!("ghcr.io/switchyard-dev/switchyard-gateway:", env!("CARGO_PKG_VERSION")))]
    gateway_image: String,
    /// A namespace to manage; repeat for several. Without any, every namespace.
    #[arg(
        long = "namespace",
        env = "SWITCHYARD_NAMESPACES",
        value_name = "NS",
        value_delimiter = ','
    )]
    namespaces: Vec<String>,
    /// Where to serve /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "SWITCHYARD_METRICS_LISTEN",
        default_value = "0.0.0.0:8081",
        value_name = "ADDR"
    )]
    metrics_listen: SocketAddr,
    /// Namespace of the leader Lease.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "default",
        value_name = "NS"
    )]
    leader_election_namespace: String,
    /// Reconcile without taking the leader Lease (one replica only).
    #[arg(long, env = "SWITCHYARD_NO_LEADER_ELECTION")]
    no_leader_election: bool,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (image, namespaces, listen, lease_ns, elect) = (
        args.gateway_image,
        args.namespaces,
        args.metrics_listen,
        args.leader_election_namespace,
        !args.no_leader_election,
    );
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    if args.log_format == LogFormat::Json {
        tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    }

    let metrics = Arc::new(Metrics::default());
    let config = kube::Config::infer()
        .await
        .context("cannot find the Kubernetes API's address and credentials")?;
    let counted = metrics.clone();
    let client = kube::client::ClientBuilder::try_from(config)
        .context("cannot build a Kubernetes API client")?
        .with_layer(&tower::util::MapRequestLayer::new(
            move |req: hyper::Request<kube::client::Body>| {
                counted.request(req.method().as_str(), req.uri().path(), req.uri().query());
                req
            },
        ))
        .build();
    // A clear start-up error when the CRDs are missing, instead of endless watch errors.
    let crds: kube::Api<crds::k8s::CustomResourceDefinition> = kube::Api::all(client.clone());
    for crd in [
        crds::ProviderPool::crd_name(),
        crds::RoutingPolicy::crd_name(),
    ] {
        if crds
            .get_opt(crd)
            .await
            .context("cannot read CustomResourceDefinitions")?
            .is_none()
        {
            bail!(
                "the CRD {crd} is not installed; install the chart (or kubectl apply -f charts/switchyard/crds/) first"
            );
        }
    }

    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("switchyard-operator-{}", std::process::id()));
    let events = Arc::new(events::Publisher::new(
        client.clone(),
        "switchyard-operator",
        &identity,
    ));
    let leading = Arc::new(AtomicBool::new(!elect));
    tokio::spawn(admin(listen, metrics.clone(), leading.clone()));

    let timing = leader::Timing::for_lease(Duration::from_secs(15));
    let lease = LeaderElection::new(
        client.clone(),
        &lease_ns,
        "switchyard-operator",
        &identity,
        timing.lease,
    );
    let mut acquired = None;
    if elect {
        tracing::info!(%identity, "waiting for the leader lease");
        acquired = Some(leader::acquire(&lease, timing).await);
        tracing::info!(%identity, "leading");
        leading.store(true, Ordering::SeqCst);
    }
    let stop = async {
        tokio::select! {
            () = shutdown_signal() => tracing::info!("signal received"),
            lost = async {
                match acquired {
                    Some(at) => leader::hold(&lease, timing, at).await,
                    None => std::future::pending().await,
                }
            } => {
                // Dropping the controllers below cancels every reconcile at once.
                tracing::error!(?lost, "lost the leader lease; exiting so a fresh replica can take over");
            }
        }
    };
    // One pair of controllers, with its own caches, per watched namespace (or one
    // cluster-wide pair); all stop together.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let runs = scopes.into_iter().map(|ns| {
        let mut rx = stop_rx.clone();
        watches::run(
            client.clone(),
            events.clone(),
            image.clone(),
            metrics.clone(),
            ns,
            async move {
                let _ = rx.changed().await;
            },
        )
    });
    tokio::select! {
        _ = futures_util::future::join_all(runs) => {},
        () = stop => {
            let _ = stop_tx.send(true);
        },
    }
    Ok(())
}

async fn admin(listen: SocketAddr, metrics: Arc<Metrics>, leading: Arc<AtomicBool>) {
    let Ok(listener) = tokio::net::TcpListener::bind(listen).await else {
        tracing::error!(%listen, "cannot serve /metrics");
        return;
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let leading = leading.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    let leading = leading.clone();
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/healthz" => (StatusCode::OK, "ok".to_owned()),
                            // Ready once leading (or waiting as a healthy standby).
                            "/readyz" => (
                                StatusCode::OK,
                                if leading.load(Ordering::SeqCst) {
                                    "leading"
                                } else {
                                    "standby"
                                }
                                .to_owned(),
                            ),
                            "/metrics" => (StatusCode::OK, metrics.render()),
                            _ => (StatusCode::NOT_FOUND, "not found".to_owned()),
                        };
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_repeat_or_come_comma_separated_and_other_flags_take_the_last_value() {
        let args = Args::try_parse_from([
            "switchyard-operator",
            "--namespace",
            "a",
            "--namespace=b,c",
            "--log-format",
            "json",
            "--log-format=text",
        ])
        .expect("valid");
        assert_eq!(args.namespaces, ["a", "b", "c"]);
        assert_eq!(args.log_format, LogFormat::Text);
        let err = Args::try_parse_from(["switchyard-operator", "--log-format", "yaml"])
            .expect_err("an unknown format");
        assert!(err.to_string().contains("--log-format"), "{err}");
    }
}
