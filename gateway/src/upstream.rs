//! The connection to providers: one pooled HTTP client per connect timeout, TLS by
//! rustls. What is said over it is each dialect's business (see `dialect`).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// The upstream client: pooled keep-alive connections, TLS by rustls, HTTP/2 where the
/// provider offers it through ALPN.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// TLS settings for providers: the web PKI roots, plus the certificates in `extra_ca`
/// (PEM) for providers behind a private CA, such as a self-hosted vLLM.
pub fn tls_config(extra_ca: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca {
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path)
            .map_err(|e| anyhow::anyhow!("--ca-file {}: {e}", path.display()))?
        {
            let cert = cert.map_err(|e| anyhow::anyhow!("--ca-file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("--ca-file {}: {e}", path.display()))?;
            added += 1;
        }
        anyhow::ensure!(
            added > 0,
            "--ca-file {}: no PEM certificate in it",
            path.display()
        );
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A client whose TCP connect gives up after `connect`.
pub fn new_client(connect: Duration, idle: Duration, tls: rustls::ClientConfig) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect));
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    // Without a timer the pool never closes idle connections.
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle)
        .pool_max_idle_per_host(256)
        .build(https)
}
