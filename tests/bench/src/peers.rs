//! The proxies a user would pick instead of Switchyard — LiteLLM's proxy and Portkey's
//! gateway — measured with the same upstream, requests and load as the gateway section,
//! beside direct, nginx and switchyard-gateway measured again in the same run (numbers from
//! different runs on a shared 2-core machine do not compare); then a streaming case
//! through all of them.
//!
//! Each peer is installed on first use at a pinned version: LiteLLM into `.venv-peers` at
//! the repo root (from `tests/bench/requirements-peers.txt`, frozen in full), Portkey into
//! `target/peers/` with npm. A peer that cannot be installed or started costs one line of
//! the report, not the run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::HeaderMap;
use hyper::header::HeaderValue;

use super::{
    HttpClient, Procs, Stats, answers, client, cmd_output, cpu_seconds, fixed_rate, free_port,
    gateway_manifests, process_tree, request_body, rss_kib, saturate, start_fake, start_gateway,
    start_nginx, summarize, wait_http,
};

pub const HEADING: &str = "## Peers: LiteLLM and Portkey";

const LITELLM_VERSION: &str = "1.100.0";
const PORTKEY_VERSION: &str = "1.15.2";
/// The @hono/node-server that Portkey's own lockfile builds with. With a later one
/// (1.14.2, or the 1.19 that npm picks by default; both tried here) every streamed answer
/// fails with `TypeError: immutable`: Portkey appends its headers to a response whose
/// headers newer versions hand over from the upstream fetch as they are, read-only.
const HONO_NODE_SERVER_VERSION: &str = "1.13.5";

/// The fixed rate each peer is measured at: well below its saturation throughput here
/// (LiteLLM's one Python worker saturates near 100/s, Portkey at a few hundred), since an
/// open loop close to saturation measures the queue rather than the proxy. Direct, nginx
/// and switchyard-gateway are measured at both.
const LITELLM_RATE: u32 = 25;
const PORTKEY_RATE: u32 = 100;
const RATES: [u32; 2] = [LITELLM_RATE, PORTKEY_RATE];

/// The streaming case's pacing: the fake provider sends a word every this many ms (its
/// `slow:<ms>` fault), so that each chunk reaches a proxy on its own, as a model's tokens
/// do, rather than several in one read.
const STREAM_PACE_MS: u64 = 5;
/// Streams per target at most (and at most the run's `--seconds`).
const MAX_STREAMS: usize = 200;

/// An alternative to Switchyard that a user would install.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Peer {
    LiteLlm,
    Portkey,
}

/// What a peer needs to start, once installed.
struct Installed {
    /// LiteLLM's `litellm` command, or Portkey's server script.
    program: PathBuf,
    /// Its version and its runtime's, for the report.
    versions: String,
}

// === impl Peer ===

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Self::LiteLlm => "LiteLLM proxy",
            Self::Portkey => "Portkey gateway",
        }
    }

    fn rates(self) -> &'static [u32] {
        match self {
            Self::LiteLlm => &[LITELLM_RATE],
            Self::Portkey => &RATES,
        }
    }

    /// Where its output goes.
    fn log(self, dir: &Path) -> PathBuf {
        dir.join(match self {
            Self::LiteLlm => "litellm.log",
            Self::Portkey => "portkey.log",
        })
    }

    /// The path that answers 200 once the server takes requests.
    fn ready_path(self) -> &'static str {
        match self {
            Self::LiteLlm => "/health/readiness",
            Self::Portkey => "/",
        }
    }

    fn install(self, bin: &Path) -> anyhow::Result<Installed> {
        match self {
            Self::LiteLlm => install_litellm(),
            // Next to the release binaries' directory, in the target directory: a cache
            // that `cargo clean` removes and git ignores.
            Self::Portkey => install_portkey(&bin.parent().unwrap_or(bin).join("peers")),
        }
    }

    /// Starts the peer on `port` with the fake provider on `upstream` as its only model.
    fn start(
        self,
        installed: &Installed,
        dir: &Path,
        port: u16,
        upstream: u16,
    ) -> anyhow::Result<Child> {
        let mut cmd = match self {
            Self::LiteLlm => {
                let config = dir.join("litellm.yaml");
                // One model, `m` as the requests name it, sent on as `m` to an
                // OpenAI-compatible upstream; no database, so no keys or spend tracking.
                std::fs::write(
                    &config,
                    format!(
                        "model_list:\n  - model_name: m\n    litellm_params:\n      model: openai/m\n      api_base: http://127.0.0.1:{upstream}/v1\n      api_key: sk-bench\n"
                    ),
                )?;
                // uvicorn's access log writes a line per request; the other peers write none.
                let log_config = dir.join("litellm-logging.json");
                std::fs::write(
                    &log_config,
                    r#"{"version": 1, "disable_existing_loggers": false,
 "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
 "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "WARNING"},
             "uvicorn.access": {"handlers": ["stderr"], "level": "WARNING", "propagate": false}}}
"#,
                )?;
                let mut cmd = Command::new(&installed.program);
                cmd.arg("--config")
                    .arg(&config)
                    .arg("--log_config")
                    .arg(&log_config)
                    .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--num_workers", "1", "--telemetry", "False"])
                    // Without it LiteLLM fetches its model price list from the internet at
                    // start; the copy in the package is what the bench wants anyway.
                    .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
                    .env("LITELLM_LOG", "ERROR")
                    .env_remove("DATABASE_URL");
                cmd
            }
            Self::Portkey => {
                // The start script has no flag for the listen address and binds every
                // interface; this preload keeps it on loopback.
                let preload = dir.join("portkey-loopback.mjs");
                std::fs::write(
                    &preload,
                    "import net from 'node:net';\nconst listen = net.Server.prototype.listen;\nnet.Server.prototype.listen = function (port, host, ...rest) {\n  if (typeof port !== 'number') return listen.call(this, port, host, ...rest);\n  if (typeof host === 'function') return listen.call(this, port, '127.0.0.1', host, ...rest);\n  return listen.call(this, port, host ?? '127.0.0.1', ...rest);\n};\n",
                )?;
                let mut cmd = Command::new("node");
                cmd.arg("--import")
                    .arg(format!("file://{}", preload.display()))
                    .arg(&installed.program)
                    .arg(format!("--port={port}"))
                    .arg("--headless")
                    // Its default list; said here so a variable in the user's environment
                    // cannot refuse the fake provider's address.
                    .env("TRUSTED_CUSTOM_HOSTS", "127.0.0.1");
                cmd
            }
        };
        let log = std::fs::File::create(self.log(dir))?;
        Ok(cmd.stdout(log.try_clone()?).stderr(log).spawn()?)
    }

    /// Headers every request to the peer carries: Portkey takes its upstream from them
    /// (no config file), LiteLLM from its config.
    fn headers(self, upstream: u16) -> anyhow::Result<HeaderMap> {
        let mut headers = HeaderMap::new();
        if let Self::Portkey = self {
            headers.insert("x-portkey-provider", HeaderValue::from_static("openai"));
            headers.insert(
                "x-portkey-custom-host",
                HeaderValue::from_str(&format!("http://127.0.0.1:{upstream}/v1"))?,
            );
            headers.insert("authorization", HeaderValue::from_static("Bearer sk-bench"));
        }
        Ok(headers)
    }
}

fn install_litellm() -> anyhow::Result<Installed> {
    let root = harness::repo_root();
    let venv = root.join(".venv-peers");
    let python = venv.join("bin/python");
    let python_str = python.display().to_string();
    let version = || {
        cmd_output(
            &python_str,
            &[
                "-c",
                // The proxy extra's servers too: a venv with only litellm cannot start.
                "import importlib.metadata as m; print(m.version('uvicorn') and m.version('fastapi') and m.version('litellm'))",
            ],
        )
    };
    if version() != LITELLM_VERSION {
        eprintln!("installing litellm[proxy]=={LITELLM_VERSION} into .venv-peers (once)");
        if !python.exists() {
            run_quiet(Command::new("python3").args(["-m", "venv"]).arg(&venv))
                .context("python3 -m venv")?;
        }
        run_quiet(
            Command::new(&python)
                .args(["-m", "pip", "install", "-q", "-r"])
                .arg(root.join("tests/bench/requirements-peers.txt")),
        )
        .context("pip install -r tests/bench/requirements-peers.txt")?;
        let found = version();
        if found != LITELLM_VERSION {
            bail!("after pip install, litellm reports {found}");
        }
    }
    Ok(Installed {
        program: venv.join("bin/litellm"),
        versions: format!(
            "litellm {LITELLM_VERSION} on {}",
            cmd_output(&python_str, &["--version"])
        ),
    })
}

fn install_portkey(cache: &Path) -> anyhow::Result<Installed> {
    let node = cmd_output("node", &["--version"]);
    if !node.starts_with('v') {
        bail!("node is not installed");
    }
    let dir = cache.join(format!(
        "portkey-{PORTKEY_VERSION}-node-server-{HONO_NODE_SERVER_VERSION}"
    ));
    let script = dir.join("node_modules/@portkey-ai/gateway/build/start-server.js");
    if !script.exists() {
        eprintln!(
            "installing @portkey-ai/gateway@{PORTKEY_VERSION} into {} (once)",
            dir.display()
        );
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("package.json"),
            format!(
                "{{\"private\": true,\n \"dependencies\": {{\"@portkey-ai/gateway\": \"{PORTKEY_VERSION}\"}},\n \"overrides\": {{\"@hono/node-server\": \"{HONO_NODE_SERVER_VERSION}\"}}}}\n"
            ),
        )?;
        // Its one install script runs patch-package, whose patches the published package
        // does not ship: skipping it changes nothing and keeps the result independent of
        // npm's policy on install scripts.
        run_quiet(
            Command::new("npm")
                .args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--ignore-scripts",
                    "--loglevel=error",
                ])
                .current_dir(&dir),
        )
        .context("npm install")?;
        if !script.exists() {
            bail!("npm install left no {}", script.display());
        }
    }
    Ok(Installed {
        program: script,
        versions: format!(
            "@portkey-ai/gateway {PORTKEY_VERSION} with @hono/node-server {HONO_NODE_SERVER_VERSION} on Node {node}"
        ),
    })
}

/// Runs `cmd`, failing with the last line it printed.
fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        let last = text.lines().rev().find(|l| !l.trim().is_empty());
        bail!("failed: {}", last.unwrap_or("no output").trim());
    }
    Ok(())
}

/// Waits for `port` to answer `path`, failing at once if the process exits. Separate from
/// `wait_http`: LiteLLM takes several seconds to import itself (more on a busy machine),
/// and a peer that dies at start is reported with its last log line, not after a timeout.
fn wait_ready(
    child: &mut Child,
    port: u16,
    path: &str,
    limit: Duration,
    log: &Path,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let last_log_line = || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .trim()
            .to_owned()
    };
    while started.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("exited at start ({status}): {}", last_log_line());
        }
        if answers(port, path) {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("not ready after {} s: {}", limit.as_secs(), last_log_line())
}

/// What a row measures the fake provider through.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    Direct,
    Nginx,
    Gateway,
    Peer(Peer),
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct to the fake provider",
            Self::Nginx => "nginx (1 worker)",
            Self::Gateway => "switchyard-gateway",
            Self::Peer(peer) => peer.name(),
        }
    }

    fn rates(self) -> &'static [u32] {
        match self {
            Self::Direct | Self::Nginx | Self::Gateway => &RATES,
            Self::Peer(peer) => peer.rates(),
        }
    }
}

/// One row of the section.
struct Target {
    via: Via,
    url: String,
    headers: HeaderMap,
    /// The proxy's root process; none for the direct path.
    root: Option<u32>,
}

/// What started, and why a peer did not.
struct Started {
    targets: Vec<Target>,
    /// Each peer's versions and start time.
    versions: Vec<String>,
    missing: Vec<String>,
}

/// Starts the fake provider's proxies, peers included, into `procs`; a peer that fails
/// to install or start is left out with the reason.
fn start_targets(
    bin: &Path,
    dir: &Path,
    fake_port: u16,
    procs: &mut Procs,
) -> anyhow::Result<Started> {
    let url = |port: u16| format!("http://127.0.0.1:{port}/v1/chat/completions");
    let mut targets = vec![Target {
        via: Via::Direct,
        url: url(fake_port),
        headers: HeaderMap::new(),
        root: None,
    }];
    let nginx_port = free_port()?;
    if let Some(nginx) = start_nginx(dir, nginx_port, fake_port)? {
        targets.push(Target {
            via: Via::Nginx,
            url: url(nginx_port),
            headers: HeaderMap::new(),
            root: Some(nginx.id()),
        });
        procs.0.push(nginx);
        wait_http(nginx_port, "/v1/models")?;
    }
    let gw_port = free_port()?;
    // Both of the manifest's providers are the one fake provider: the second is only
    // used when the first fails, which it does not here.
    let manifests = gateway_manifests(dir, fake_port, fake_port, "1s")?;
    let gw = start_gateway(bin, &manifests, gw_port, &dir.join("peers-gateway.log"))?;
    targets.push(Target {
        via: Via::Gateway,
        url: url(gw_port),
        headers: HeaderMap::new(),
        root: Some(gw.id()),
    });
    procs.0.push(gw);
    wait_http(gw_port, "/readyz")?;

    let mut versions = Vec::new();
    let mut missing = Vec::new();
    for peer in [Peer::LiteLlm, Peer::Portkey] {
        let started = peer.install(bin).and_then(|installed| {
            let port = free_port()?;
            let mut child = peer.start(&installed, dir, port, fake_port)?;
            let waited = wait_ready(
                &mut child,
                port,
                peer.ready_path(),
                Duration::from_secs(120),
                &peer.log(dir),
            );
            let root = child.id();
            procs.0.push(child);
            let took = waited?;
            Ok((installed, port, root, took))
        });
        match started {
            Ok((installed, port, root, took)) => {
                versions.push(format!(
                    "{}, ready {:.1} s after start",
                    installed.versions,
                    took.as_secs_f64()
                ));
                targets.push(Target {
                    via: Via::Peer(peer),
                    url: url(port),
                    headers: peer.headers(fake_port)?,
                    root: Some(root),
                });
            }
            Err(e) => missing.push(format!("- {} not measured: {e:#}.", peer.name())),
        }
    }
    Ok(Started {
        targets,
        versions,
        missing,
    })
}

/// Measures the peers and appends the section (heading, method, versions, tables).
pub async fn benchmarks(
    bin: &Path,
    dir: &Path,
    seconds: u32,
    report: &mut String,
) -> anyhow::Result<()> {
    let fake_port = free_port()?;
    let mut procs = Procs(vec![start_fake(
        bin,
        fake_port,
        "primary",
        &dir.join("peers-fake.log"),
    )?]);
    wait_http(fake_port, "/v1/models")?;
    let Started {
        targets,
        versions,
        missing,
    } = start_targets(bin, dir, fake_port, &mut procs)?;
    for t in &targets {
        // Warm-up: connections, caches, and LiteLLM's imports on its first request.
        let _ = saturate(&t.url, &t.headers, 16, 1).await;
    }

    writeln!(report, "{HEADING}\n")?;
    writeln!(
        report,
        "Method: the gateway section's upstream (the fake provider, answering at once), request (~1 KiB chat completion), open-loop generator and closed-loop saturation (64 connections), {seconds} s per run, with direct, nginx and switchyard-gateway measured again in this run so that every row shares its conditions. Each peer has one model routed to the fake provider as an OpenAI-compatible upstream: LiteLLM's proxy through its config file (`openai/m`, `api_base` on loopback, uvicorn with 1 worker, no database, access log off); Portkey's gateway (`build/start-server.js --headless`) through the request headers `x-portkey-provider: openai` and `x-portkey-custom-host: http://127.0.0.1:PORT/v1`, which the generator sends on that row only. Added latency = target − direct at the same rate; LiteLLM is measured at {LITELLM_RATE}/s and Portkey at {PORTKEY_RATE}/s, each well below its saturation throughput (next table), because an open loop near saturation measures the queue rather than the proxy. CPU is user + system time of the proxy's whole process tree during the saturation run; RSS is summed over that tree: before the saturation runs (after the fixed-rate ones), and its high-water mark at the end.\n"
    )?;
    writeln!(
        report,
        "Versions: {}; {}; switchyard-gateway from this checkout.\n",
        if versions.is_empty() {
            "no peer ran".to_owned()
        } else {
            versions.join("; ")
        },
        cmd_output("nginx", &["-v"]),
    )?;
    for line in &missing {
        writeln!(report, "{line}")?;
    }
    if !missing.is_empty() {
        writeln!(report)?;
    }
    fixed_rates(&targets, seconds, report).await?;
    saturation(&targets, seconds, report).await?;
    streaming(fake_port, &targets, seconds, report).await?;
    drop(procs);
    Ok(())
}

async fn fixed_rates(targets: &[Target], seconds: u32, report: &mut String) -> anyhow::Result<()> {
    writeln!(
        report,
        "| rate | target | p50 ms | p99 ms | max ms | errors | sent | added p50 ms | added p99 ms |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )?;
    for rate in RATES {
        let mut direct: Option<Stats> = None;
        for t in targets.iter().filter(|t| t.via.rates().contains(&rate)) {
            let s = fixed_rate(&t.url, &t.headers, rate, seconds).await;
            let added = |f: fn(&Stats) -> f64| match &direct {
                Some(d) if t.via != Via::Direct => format!("{:+.3}", f(&s) - f(d)),
                _ => "–".to_owned(),
            };
            writeln!(
                report,
                "| {rate}/s | {} | {:.3} | {:.3} | {:.1} | {} | {} | {} | {} |",
                t.via.name(),
                s.p50_ms,
                s.p99_ms,
                s.max_ms,
                s.errors,
                s.sent,
                added(|s| s.p50_ms),
                added(|s| s.p99_ms),
            )?;
            if t.via == Via::Direct {
                direct = Some(s);
            }
        }
    }
    writeln!(report)?;
    Ok(())
}

async fn saturation(targets: &[Target], seconds: u32, report: &mut String) -> anyhow::Result<()> {
    // Taken before any saturation run, so no row's footprint includes another's load.
    let warm_rss: Vec<Option<u64>> = targets
        .iter()
        .map(|t| t.root.map(|r| tree_rss(r, "VmRSS:")))
        .collect();
    writeln!(
        report,
        "| saturation | requests/s | p50 ms | p99 ms | errors | proxy CPU µs/request | proxy RSS before MB | proxy RSS peak MB |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    )?;
    // (requests/s, CPU µs per request) per row.
    let mut measured = Vec::new();
    for (t, warm) in targets.iter().zip(&warm_rss) {
        let pids = t.root.map(process_tree).unwrap_or_default();
        let before = cpu_seconds(&pids);
        let s = saturate(&t.url, &t.headers, 64, seconds).await;
        let served = (s.sent - s.errors).max(1) as f64;
        let cpu_us = (cpu_seconds(&pids) - before) / served * 1e6;
        let rps = served / s.seconds;
        measured.push((t.via, rps, cpu_us));
        let mb = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
        let (cpu, warm, peak) = match (t.root, warm) {
            (Some(root), Some(warm)) => (
                format!("{cpu_us:.1}"),
                mb(*warm),
                mb(tree_rss(root, "VmHWM:")),
            ),
            _ => ("–".into(), "–".into(), "–".into()),
        };
        writeln!(
            report,
            "| {} | {rps:.0} | {:.3} | {:.3} | {} | {cpu} | {warm} | {peak} |",
            t.via.name(),
            s.p50_ms,
            s.p99_ms,
            s.errors
        )?;
    }
    writeln!(report)?;
    let Some(&(_, gw_rps, gw_cpu)) = measured.iter().find(|(via, _, _)| *via == Via::Gateway)
    else {
        return Ok(());
    };
    let mut any = false;
    for (via, rps, cpu) in &measured {
        if let Via::Peer(peer) = via {
            writeln!(
                report,
                "- {}: {:.1}% of switchyard-gateway's saturation throughput ({rps:.0} vs {gw_rps:.0} requests/s), {:.0}× its CPU per request ({cpu:.0} vs {gw_cpu:.1} µs).",
                peer.name(),
                rps / gw_rps * 100.0,
                cpu / gw_cpu
            )?;
            any = true;
        }
    }
    if any {
        writeln!(report)?;
    }
    Ok(())
}

/// Kilobytes of `field` (`VmRSS:`, `VmHWM:`) summed over `root`'s process tree. Summed
/// high-water marks can exceed the tree's true peak when its processes peaked apart.
fn tree_rss(root: u32, field: &str) -> u64 {
    process_tree(root).iter().map(|p| rss_kib(*p, field)).sum()
}

// === streaming ===

/// When each content chunk of one stream arrived, counted from sending the request.
struct StreamTiming(Vec<Duration>);

/// A target's streams, reduced to what the table compares.
struct StreamSummary {
    first: Stats,
    last: Stats,
    /// Mean arrival of the k-th content chunk, in ms, over the streams that had one.
    mean_arrival_ms: Vec<f64>,
}

impl StreamSummary {
    fn new(timings: &[StreamTiming], errors: usize) -> Self {
        let at = |pick: fn(&[Duration]) -> Option<&Duration>| {
            let picked = timings.iter().filter_map(|t| pick(&t.0)).copied().collect();
            summarize(picked, errors, 0.0)
        };
        let longest = timings.iter().map(|t| t.0.len()).max().unwrap_or(0);
        let mean_arrival_ms = (0..longest)
            .map(|k| {
                let arrivals: Vec<f64> = timings
                    .iter()
                    .filter_map(|t| t.0.get(k))
                    .map(|d| d.as_secs_f64() * 1000.0)
                    .collect();
                arrivals.iter().sum::<f64>() / arrivals.len().max(1) as f64
            })
            .collect();
        Self {
            first: at(<[Duration]>::first),
            last: at(<[Duration]>::last),
            mean_arrival_ms,
        }
    }

    /// How much later, on average over the chunk positions both have, a chunk arrives
    /// here than in `direct`.
    fn per_chunk_overhead_ms(&self, direct: &Self) -> f64 {
        let deltas: Vec<f64> = self
            .mean_arrival_ms
            .iter()
            .zip(&direct.mean_arrival_ms)
            .map(|(here, there)| here - there)
            .collect();
        deltas.iter().sum::<f64>() / deltas.len().max(1) as f64
    }
}

async fn streaming(
    fake_port: u16,
    targets: &[Target],
    seconds: u32,
    report: &mut String,
) -> anyhow::Result<()> {
    // A fault rule with no count stays until cleared, and `slow` changes only streamed
    // answers: everything after this point streams.
    let paced = Command::new("curl")
        .args([
            "-sf",
            "-o",
            "/dev/null",
            "-XPOST",
            &format!("http://127.0.0.1:{fake_port}/admin/faults"),
            "-d",
            &format!("{{\"fault\":\"slow:{STREAM_PACE_MS}\"}}"),
        ])
        .status()?;
    if !paced.success() {
        bail!("the fake provider refused the slow:{STREAM_PACE_MS} fault");
    }
    let mut request: serde_json::Value = serde_json::from_slice(&request_body())?;
    request["stream"] = serde_json::Value::Bool(true);
    let body = Bytes::from(request.to_string());

    writeln!(report, "### Streaming\n")?;
    writeln!(
        report,
        "Method: the same body with `\"stream\": true`; the fake provider paces its answer (`slow:{STREAM_PACE_MS}`): a role chunk, then 12 content chunks (one per word), the first at once and then one every {STREAM_PACE_MS} ms. Per target, 3 warm-up streams, then one stream at a time, at most {MAX_STREAMS} or for {seconds} s; a stream counts only if it ends with `[DONE]`. Times run from sending the request to the arrival of a chunk whose `delta.content` is not empty: the first (TTFT) and the last (the whole answer). Per-chunk overhead: for each chunk position k, the mean arrival of chunk k through the target minus through direct, averaged over the 12 positions; it charges a proxy for every chunk it delays, including those held back behind a late first one, and a proxy that delays each chunk by the same d shows d in all three added columns.\n"
    )?;
    writeln!(
        report,
        "| target | streams | errors | content chunks | TTFT p50 ms | TTFT p99 ms | added TTFT p50 ms | last chunk p50 ms | added last chunk p50 ms | per-chunk overhead ms |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )?;
    let client = client(1);
    let mut direct: Option<StreamSummary> = None;
    for t in targets {
        for _ in 0..3 {
            let _ = timed_stream(&client, &t.url, &body, &t.headers).await;
        }
        let deadline = Instant::now() + Duration::from_secs(u64::from(seconds));
        let mut timings = Vec::new();
        let mut errors = 0;
        while timings.len() + errors < MAX_STREAMS && Instant::now() < deadline {
            match timed_stream(&client, &t.url, &body, &t.headers).await {
                Some(timing) => timings.push(timing),
                None => errors += 1,
            }
        }
        let mut chunks: Vec<usize> = timings.iter().map(|s| s.0.len()).collect();
        chunks.sort_unstable();
        let chunks = match (chunks.first(), chunks.last()) {
            (Some(lo), Some(hi)) if lo == hi => lo.to_string(),
            (Some(lo), Some(hi)) => format!("{lo}–{hi}"),
            _ => "–".to_owned(),
        };
        let summary = StreamSummary::new(&timings, errors);
        let added = |f: &dyn Fn(&StreamSummary) -> f64| match &direct {
            Some(d) if t.via != Via::Direct => format!("{:+.3}", f(&summary) - f(d)),
            _ => "–".to_owned(),
        };
        let overhead = match &direct {
            Some(d) if t.via != Via::Direct => {
                format!("{:+.3}", summary.per_chunk_overhead_ms(d))
            }
            _ => "–".to_owned(),
        };
        writeln!(
            report,
            "| {} | {} | {errors} | {chunks} | {:.3} | {:.3} | {} | {:.3} | {} | {overhead} |",
            t.via.name(),
            timings.len(),
            summary.first.p50_ms,
            summary.first.p99_ms,
            added(&|s| s.first.p50_ms),
            summary.last.p50_ms,
            added(&|s| s.last.p50_ms),
        )?;
        if t.via == Via::Direct {
            direct = Some(summary);
        }
    }
    writeln!(report)?;
    Ok(())
}

/// Sends one streamed request and times its content chunks as they arrive; `None` on
/// any failure, a stream without `[DONE]`, or one longer than 10 s.
async fn timed_stream(
    client: &HttpClient,
    url: &str,
    body: &Bytes,
    headers: &HeaderMap,
) -> Option<StreamTiming> {
    let mut req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .ok()?;
    for (name, value) in headers {
        req.headers_mut().insert(name, value.clone());
    }
    let read = async {
        let sent = Instant::now();
        let resp = client.request(req).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let mut body = resp.into_body();
        let mut pending = Vec::new();
        let mut content_at = Vec::new();
        let mut done = false;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.ok()?.into_data() else {
                continue;
            };
            let at = Instant::now();
            pending.extend_from_slice(&data);
            // Server-sent events arrive split anywhere; only whole lines are read.
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                match sse_line(&line) {
                    SseLine::Content => content_at.push(at),
                    SseLine::Done => done = true,
                    SseLine::Other => {}
                }
            }
        }
        let arrivals = content_at.iter().map(|at| *at - sent).collect::<Vec<_>>();
        (done && !arrivals.is_empty()).then_some(StreamTiming(arrivals))
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()
        .flatten()
}

#[derive(Debug, PartialEq)]
enum SseLine {
    /// A chunk carrying some of the answer's text.
    Content,
    Done,
    /// Anything else: the role chunk, the finish chunk, comments, blank lines.
    Other,
}

fn sse_line(line: &[u8]) -> SseLine {
    let line = String::from_utf8_lossy(line);
    let Some(data) = line.trim_end().strip_prefix("data:") else {
        return SseLine::Other;
    };
    let data = data.trim();
    if data == "[DONE]" {
        return SseLine::Done;
    }
    let chunk: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
    let has_text = chunk
        .pointer("/choices/0/delta/content")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|s| !s.is_empty());
    if has_text {
        SseLine::Content
    } else {
        SseLine::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_chunks_with_text_count_as_content() {
        let role = br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#;
        let word = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello \"}}]}\r\n";
        let finish = br#"data: {"choices":[{"delta":{},"finish_reason":"stop"}]}"#;
        assert_eq!(sse_line(role), SseLine::Other);
        assert_eq!(sse_line(word), SseLine::Content);
        assert_eq!(sse_line(finish), SseLine::Other);
        assert_eq!(sse_line(b"data: [DONE]\n"), SseLine::Done);
        assert_eq!(sse_line(b": keep-alive\n"), SseLine::Other);
    }

    #[test]
    fn a_constant_delay_per_chunk_is_the_per_chunk_overhead() {
        let ms = Duration::from_millis;
        let stream = |delay: u64| StreamTiming((0..12).map(|k| ms(1 + 5 * k + delay)).collect());
        let direct = StreamSummary::new(&[stream(0), stream(0)], 0);
        let proxy = StreamSummary::new(&[stream(2), stream(2)], 0);
        assert!((proxy.per_chunk_overhead_ms(&direct) - 2.0).abs() < 1e-9);
        assert!((proxy.first.p50_ms - direct.first.p50_ms - 2.0).abs() < 1e-9);
        assert!((proxy.last.p50_ms - direct.last.p50_ms - 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_held_first_chunk_costs_every_chunk_queued_behind_it() {
        let ms = Duration::from_millis;
        let direct = StreamSummary::new(&[StreamTiming((0..4).map(|k| ms(10 * k)).collect())], 0);
        // The first chunk held 25 ms: the next two arrive with it, the last on time.
        let held = [25, 25, 25, 30].map(ms).to_vec();
        let proxy = StreamSummary::new(&[StreamTiming(held)], 0);
        assert!(
            (proxy.per_chunk_overhead_ms(&direct) - (25.0 + 15.0 + 5.0 + 0.0) / 4.0).abs() < 1e-9
        );
    }
}
