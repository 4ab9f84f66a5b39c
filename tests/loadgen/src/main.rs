//! `loadgen`: an open-loop OpenAI-API client for measuring what routine operations cost
//! clients. It sends chat completions at a fixed rate (a share of them streamed), keeps
//! connections alive as SDKs do, never retries, and counts every request that does not
//! end in a complete answer: a status other than 200, a connection error, a timeout, or a
//! stream that stops before `data: [DONE]`.
//!
//! ```text
//! loadgen --url http://gw.ns.svc.cluster.local:8080 [--rate 200] [--seconds 30] [--model m]
//!         [--stream-share 0.5] [--key KEY] [--timeout 10]
//! loadgen --resolve NAME     # print NAME's addresses (a DNS check from inside a pod)
//! ```
//!
//! A progress line per second goes to stderr; the summary is one JSON object on the last
//! line of stdout. Bounded in count (rate × seconds) and time (each request's timeout).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Debug)]
struct Args {
    url: String,
    rate: u32,
    seconds: u32,
    model: String,
    stream_share: f64,
    key: Option<String>,
    timeout: Duration,
}

/// What to do.
enum Mode {
    Load(Args),
    Resolve(String),
}

fn parse() -> anyhow::Result<Mode> {
    let mut args = Args {
        url: String::new(),
        rate: 200,
        seconds: 30,
        model: "m".into(),
        stream_share: 0.5,
        key: std::env::var("LOADGEN_KEY").ok(),
        timeout: Duration::from_secs(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut v = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--url" => args.url = v()?.trim_end_matches('/').to_owned(),
            "--rate" => args.rate = v()?.parse().context("--rate needs a number")?,
            "--seconds" => args.seconds = v()?.parse().context("--seconds needs a number")?,
            "--model" => args.model = v()?,
            "--stream-share" => {
                args.stream_share = v()?.parse().context("--stream-share needs 0..1")?
            }
            "--key" => args.key = Some(v()?),
            "--timeout" => {
                args.timeout = Duration::from_secs(v()?.parse().context("--timeout needs seconds")?)
            }
            "--resolve" => return Ok(Mode::Resolve(v()?)),
            other => bail!("unknown argument {other}"),
        }
    }
    if args.url.is_empty() {
        bail!("--url is required");
    }
    if args.rate == 0 || args.seconds == 0 || args.seconds > 3600 {
        bail!("--rate must be positive and --seconds in 1..=3600");
    }
    Ok(Mode::Load(args))
}

/// How one request ended.
enum Outcome {
    Ok(Duration),
    Failed(String),
}

async fn one(client: &HttpClient, args: &Args, stream: bool) -> Result<(), String> {
    let body = format!(
        "{{\"model\":\"{}\",\"stream\":{stream},\"messages\":[{{\"role\":\"user\",\"content\":\"hello from loadgen\"}}]}}",
        args.model
    );
    let mut req = hyper::Request::post(format!("{}/v1/chat/completions", args.url))
        .header("content-type", "application/json");
    if let Some(key) = &args.key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("request: {e}"))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("connect/send: {}", root_cause(&e)))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body cut: {}", root_cause(&e)))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("status {}", status.as_u16()));
    }
    if stream {
        if !body.ends_with(b"data: [DONE]\n\n") {
            return Err("stream ended without [DONE]".into());
        }
        if contains(&body, b"\"error\"") {
            return Err("stream carried an error event".into());
        }
    }
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut e = e;
    while let Some(source) = e.source() {
        e = source;
    }
    e.to_string()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = match parse()? {
        Mode::Load(args) => args,
        Mode::Resolve(name) => {
            let addrs: Vec<String> = tokio::net::lookup_host((name.as_str(), 80))
                .await
                .with_context(|| format!("resolving {name}"))?
                .map(|a| a.ip().to_string())
                .collect();
            println!(
                "{}",
                serde_json::json!({ "name": name, "addresses": addrs })
            );
            return Ok(());
        }
    };
    let args = std::sync::Arc::new(args);
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(2)));
    // hyper-util would silently resend a request whose pooled connection the server had
    // just closed; that is the very failure a shutdown can cause, so it must count.
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .retry_canceled_requests(false)
        .build(http);
    let total = u64::from(args.rate) * u64::from(args.seconds);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Outcome)>();
    let start = Instant::now() + Duration::from_millis(20);
    let sender = {
        let args = args.clone();
        tokio::spawn(async move {
            for i in 0..total {
                let due = start + Duration::from_secs_f64(i as f64 / f64::from(args.rate));
                tokio::time::sleep_until(due).await;
                // Spread streamed requests evenly: request i streams when the running
                // share falls behind the target.
                let stream = ((i + 1) as f64 * args.stream_share).floor()
                    > (i as f64 * args.stream_share).floor();
                let (client, args, tx) = (client.clone(), args.clone(), tx.clone());
                tokio::spawn(async move {
                    let outcome =
                        match tokio::time::timeout(args.timeout, one(&client, &args, stream)).await
                        {
                            Ok(Ok(())) => Outcome::Ok(due.elapsed()),
                            Ok(Err(e)) => Outcome::Failed(e),
                            Err(_) => Outcome::Failed("timeout".into()),
                        };
                    let second = due.duration_since(start).as_secs();
                    let _ = tx.send((second, outcome));
                });
            }
        })
    };
    let mut latencies = Vec::with_capacity(total as usize);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed_seconds: BTreeMap<u64, u64> = BTreeMap::new();
    let mut done = 0u64;
    let mut last_report = Instant::now();
    while done < total {
        let Some((second, outcome)) = rx.recv().await else {
            break;
        };
        done += 1;
        match outcome {
            Outcome::Ok(d) => latencies.push(d),
            Outcome::Failed(e) => {
                *failures.entry(e).or_default() += 1;
                *failed_seconds.entry(second).or_default() += 1;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!(
                "loadgen: {done}/{total} done, {} failed",
                failures.values().sum::<u64>()
            );
        }
    }
    let _ = sender.await;
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    // A request that never reported (a task that died) is a failure too.
    let failed = total - latencies.len() as u64;
    println!(
        "{}",
        serde_json::json!({
            "sent": total,
            "ok": latencies.len(),
            "failed": failed,
            "failures": failures,
            "failed_at_second": failed_seconds,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            "rate": args.rate,
            "seconds": args.seconds,
            "stream_share": args.stream_share,
        })
    );
    Ok(())
}
