//! Time to recover: how long after a provider comes back the gateway sends it traffic
//! again, and how many client requests met the outage on the way.
//!
//! A primary and a secondary fake provider behind one route; the primary is made to
//! answer 503 for a set time (`flap:<ms>`), a request trips its breaker (one failure
//! opens it, for a minute), and then a client sends a request every 20 ms until the
//! primary serves one. The time from the primary's recovery to that request is the
//! time to recover. With recovery checks off, the breaker's `openFor` (10 s in that row)
//! decides instead.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::{HttpClient, Procs, client, free_port, start_fake, start_gateway, wait_http};

/// The section's heading in BENCHMARKS.md.
pub const HEADING: &str = "## Failover: time to recover";

/// Outage lengths tried, in milliseconds.
const DOWN_MS: [u64; 5] = [1_000, 2_000, 3_000, 5_000, 8_000];

fn manifests(
    dir: &Path,
    primary: u16,
    secondary: u16,
    checks: bool,
) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join(if checks {
        "recovery.yaml"
    } else {
        "recovery-off.yaml"
    });
    let (recovery, open_for) = if checks {
        ("", "60s")
    } else {
        (", health: {recovery: {request: none}}", "10s")
    };
    std::fs::write(
        &path,
        format!(
            "apiVersion: switchyard.dev/v1alpha1\nkind: ProviderPool\nmetadata: {{name: bench}}\nspec:\n  regions: [{{name: local}}]\n  providers:\n  - {{name: primary, type: openaiCompatible, endpoint: 'http://127.0.0.1:{primary}', region: local, models: [{{name: m}}]{recovery}}}\n  - {{name: secondary, type: openaiCompatible, endpoint: 'http://127.0.0.1:{secondary}', region: local, priority: 1, models: [{{name: m}}]}}\n---\napiVersion: switchyard.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {{name: bench}}\nspec:\n  poolRef: {{name: bench}}\n  routes: [{{model: m, targets: [{{provider: primary}}, {{provider: secondary}}]}}]\n  retry: {{attempts: 1}}\n  timeouts: {{connect: 500ms, firstByte: 1s, total: 10s}}\n  circuitBreaker: {{consecutiveFailures: 1, openFor: {open_for}}}\n"
        ),
    )?;
    Ok(path)
}

async fn call(
    client: &HttpClient,
    method: &str,
    url: &str,
    body: &str,
) -> Option<(u16, String, Bytes)> {
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let provider = resp
        .headers()
        .get("x-switchyard-provider")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, provider, body))
}

/// One outage of `down`: (time to recover, client requests that met the outage,
/// recovery checks sent), or `None` when the primary never served again in time.
async fn outage(
    client: &HttpClient,
    gw: &str,
    fake: &str,
    down: Duration,
) -> anyhow::Result<Option<(Duration, usize, usize)>> {
    call(client, "POST", &format!("{fake}/admin/reset"), "{}").await;
    let fault = format!("{{\"fault\": \"flap:{}\"}}", down.as_millis());
    call(client, "POST", &format!("{fake}/admin/faults"), &fault)
        .await
        .ok_or_else(|| anyhow::anyhow!("the fake provider refused the fault"))?;
    let up_at = Instant::now() + down;
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let url = format!("{gw}/v1/chat/completions");
    let deadline = up_at + Duration::from_secs(20);
    let mut back = None;
    while Instant::now() < deadline {
        if let Some((200, provider, _)) = call(client, "POST", &url, chat).await
            && provider == "primary"
            && Instant::now() > up_at
        {
            back = Some(Instant::now().saturating_duration_since(up_at));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Some(back) = back else {
        return Ok(None);
    };
    let (_, _, seen) = call(client, "GET", &format!("{fake}/admin/attempts"), "")
        .await
        .ok_or_else(|| anyhow::anyhow!("no attempts from the fake provider"))?;
    let seen: Vec<serde_json::Value> = serde_json::from_slice(&seen)?;
    let check = |a: &serde_json::Value| {
        a["headers"]["x-request-id"] == "switchyard-recovery-check" || a["method"] == "GET"
    };
    let met = seen
        .iter()
        .filter(|a| !check(a) && !a["fault"].is_null())
        .count();
    let checks = seen.iter().filter(|a| check(a)).count();
    Ok(Some((back, met, checks)))
}

/// Measures and writes the section.
pub async fn benchmarks(bin: &Path, dir: &Path, report: &mut String) -> anyhow::Result<()> {
    writeln!(report, "{HEADING}\n")?;
    writeln!(
        report,
        "Method: a primary and a secondary fake provider behind one route (one failure opens the breaker, `openFor: 60s`, `retry.attempts: 1`); the primary answers 503 for the outage's length; a client sends a request every 20 ms until the primary serves one. Time to recover is from the primary's recovery to that request. Target (#14): ≤ 5 s, and no client request beyond the first meets the outage. Recovery checks at their defaults (first after 250 ms, doubling to 4 s).\n"
    )?;
    writeln!(
        report,
        "| outage | recovery checks | time to recover | client requests that met the outage | checks sent |\n| --- | --- | --- | --- | --- |"
    )?;
    let http = client(4);
    for (checks, downs) in [(true, &DOWN_MS[..]), (false, &DOWN_MS[1..2])] {
        let (primary, secondary, gw_port) = (free_port()?, free_port()?, free_port()?);
        let mut procs = Procs(Vec::new());
        procs.0.push(start_fake(
            bin,
            primary,
            "primary",
            &dir.join("recovery-primary.log"),
        )?);
        procs.0.push(start_fake(
            bin,
            secondary,
            "secondary",
            &dir.join("recovery-secondary.log"),
        )?);
        let m = manifests(dir, primary, secondary, checks)?;
        procs.0.push(start_gateway(
            bin,
            &m,
            gw_port,
            &dir.join("recovery-gateway.log"),
        )?);
        wait_http(primary, "/v1/models")?;
        wait_http(gw_port, "/readyz")?;
        let (gw, fake) = (
            format!("http://127.0.0.1:{gw_port}"),
            format!("http://127.0.0.1:{primary}"),
        );
        for &ms in downs {
            let label = if checks {
                "default"
            } else {
                "off (`request: none`, `openFor: 10s`)"
            };
            match outage(&http, &gw, &fake, Duration::from_millis(ms)).await? {
                Some((back, met, sent)) => writeln!(
                    report,
                    "| {:.0} s | {label} | {:.2} s | {met} | {sent} |",
                    ms as f64 / 1000.0,
                    back.as_secs_f64()
                )?,
                None => writeln!(
                    report,
                    "| {:.0} s | {label} | not within 20 s | – | – |",
                    ms as f64 / 1000.0
                )?,
            }
            // The next outage starts from a closed breaker.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        drop(procs);
    }
    writeln!(report)?;
    Ok(())
}
