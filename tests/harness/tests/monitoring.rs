//! Monitoring end to end: a real Prometheus (Debian's package) scrapes a running gateway
//! and the operator with the chart's alert rules loaded; every metric and label the rules
//! read exists, an induced provider outage makes the failover and ejection alerts go
//! pending, and every query of the chart's Grafana dashboard parses and reads only
//! metrics the components export. The pool asks for traces: the gateway, run with the
//! environment the operator rendered for it, exports them to an OTLP receiver.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{Cluster, repo_root, workspace_binary};
use serde_json::Value;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn curl(args: &[&str]) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5"])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sets a fault on the fake provider at `port`.
fn fault(port: u16, spec: &str) {
    curl(&[
        "-XPOST",
        &format!("http://127.0.0.1:{port}/admin/faults"),
        "-d",
        &format!(r#"{{"fault":"{spec}"}}"#),
    ])
    .expect("fault set");
}

fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A Prometheus API query's `data`.
fn api(prometheus: &str, path: &str) -> Option<Value> {
    let body = curl(&[&format!("{prometheus}{path}")])?;
    let v: Value = serde_json::from_str(&body).ok()?;
    (v["status"] == "success").then(|| v["data"].clone())
}

/// The chart's alert rules, rendered with their defaults.
fn rules(c: &Cluster) -> Value {
    let out = c
        .helm()
        .args([
            "template",
            "sy",
            &repo_root().join("charts/switchyard").display().to_string(),
            "--set",
            "prometheusRule.enabled=true",
            "-s",
            "templates/prometheusrule.yaml",
        ])
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rule: Value = serde_norway::from_slice(&out.stdout).expect("a PrometheusRule");
    rule["spec"].clone()
}

/// Metric names in `expr`, each with the labels its aggregation groups by.
fn metrics_and_labels(expr: &str) -> Vec<(String, BTreeSet<String>)> {
    let grouped: BTreeSet<String> = expr
        .split("by (")
        .skip(1)
        .filter_map(|rest| rest.split_once(')'))
        .flat_map(|(labels, _)| labels.split(',').map(|l| l.trim().to_owned()))
        .collect();
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("switchyard_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        // Label names such as switchyard_dev_region share the prefix.
        if name.starts_with("switchyard_gateway_") || name.starts_with("switchyard_operator_") {
            found.push((name, grouped.clone()));
        }
    }
    found
}

#[test]
fn prometheus_scrapes_gateway_and_operator_and_an_outage_makes_the_alerts_pending() {
    harness::monitoring_crds().expect("prometheus and promtool installed");
    let c = Cluster::shared();
    let crds = repo_root()
        .join("charts/switchyard/crds")
        .display()
        .to_string();
    c.kubectl_ok(&["apply", "--server-side", "-f", &crds])
        .expect("CRDs install");
    c.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/providerpools.switchyard.dev",
    ])
    .expect("CRDs established");

    // The operator, with a pool to report on.
    let (operator_port, gateway_admin, gateway_port, prometheus_port, otlp_port) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let mut op = Command::new(
        workspace_binary("switchyard-operator", "switchyard-operator").expect("operator builds"),
    );
    op.args([
        "--gateway-image",
        "switchyard-gateway:e2e",
        "--metrics-listen",
        &format!("127.0.0.1:{operator_port}"),
        "--leader-election-namespace",
        "default",
    ]);
    let mut procs = vec![c.spawn_process("operator", op).expect("operator starts")];
    let ns = c.namespace("monitoring").expect("namespace");
    let pool = "apiVersion: v1\nkind: Secret\nmetadata: {name: key}\nstringData: {apiKey: k}\n---\n\
apiVersion: switchyard.dev/v1alpha1\nkind: ProviderPool\nmetadata: {name: chat}\nspec:\n  regions: [{name: us-east}]\n  gateway: {tracing: {endpoint: 'http://127.0.0.1:OTLP_PORT'}}\n  providers:\n  - {name: p, type: openai, endpoint: 'https://api.openai.com', region: us-east, credentials: {secretRef: {name: key}}, models: [{name: m}]}\n---\n\
apiVersion: switchyard.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {name: chat}\nspec:\n  poolRef: {name: chat}\n  routes: [{model: m, targets: [{provider: p}]}]\n";
    let pool = pool.replace("OTLP_PORT", &otlp_port.to_string());
    let (ok, _, err) = c
        .kubectl_input(&["apply", "-n", ns.name(), "-f", "-"], &pool)
        .expect("kubectl");
    assert!(ok, "{err}");

    // The pool asks for traces: the operator puts the OpenTelemetry variables on its
    // gateway Deployment, and the gateway below runs with them, as its pod would.
    let otel_env: Vec<(String, String)> = wait_for(
        "the gateway Deployment with tracing",
        Duration::from_secs(60),
        || {
            let out = c
                .kubectl_ok(&[
                    "get",
                    "deploy",
                    "chat-us-east",
                    "-n",
                    ns.name(),
                    "-o",
                    "json",
                ])
                .ok()?;
            let d: Value = serde_json::from_str(&out).ok()?;
            let env: Vec<(String, String)> = d["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()?
                .iter()
                .filter_map(|e| {
                    Some((
                        e["name"].as_str()?.to_owned(),
                        e["value"].as_str()?.to_owned(),
                    ))
                })
                .filter(|(k, _)| k.starts_with("OTEL_"))
                .map(|(k, v)| (k, v.replace("$(POD_NAME)", "chat-us-east-0")))
                .collect();
            (!env.is_empty()).then_some(env)
        },
    );
    let spans_file = tempfile::NamedTempFile::new().expect("spans file");
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: ./tests/run.sh creates it (tests/gateway/requirements.txt)",
        python.display()
    );
    let mut receiver = Command::new(python);
    receiver.args([
        &repo_root()
            .join("tests/gateway/otlp_receiver.py")
            .display()
            .to_string(),
        &otlp_port.to_string(),
        &spans_file.path().display().to_string(),
    ]);
    procs.push(
        c.spawn_process("otlp-receiver", receiver)
            .expect("the OTLP receiver starts"),
    );

    // A gateway in front of two fake providers, as a pod of that pool would run.
    let fake = workspace_binary("fake-provider", "fake-provider").expect("fake builds");
    let (alpha, beta) = (free_port(), free_port());
    for (name, port) in [("alpha", alpha), ("beta", beta)] {
        let mut cmd = Command::new(&fake);
        cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--name", name]);
        procs.push(
            c.spawn_process(&format!("fake-{name}"), cmd)
                .expect("fake starts"),
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("gateway.yaml");
    std::fs::write(
        &manifests,
        format!(
            "apiVersion: switchyard.dev/v1alpha1\nkind: ProviderPool\nmetadata: {{name: chat}}\nspec:\n  regions: [{{name: us-east}}]\n  providers:\n  - {{name: alpha, type: openaiCompatible, endpoint: 'http://127.0.0.1:{alpha}', region: us-east, models: [{{name: gpt-4o}}]}}\n  - {{name: beta, type: openaiCompatible, endpoint: 'http://127.0.0.1:{beta}', region: us-east, priority: 1, models: [{{name: gpt-4o}}]}}\n---\napiVersion: switchyard.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {{name: chat}}\nspec:\n  poolRef: {{name: chat}}\n  routes: [{{model: gpt-4o, targets: [{{provider: alpha}}, {{provider: beta}}]}}]\n"
        ),
    )
    .expect("manifests");
    let mut gw = Command::new(
        workspace_binary("switchyard-gateway", "switchyard-gateway").expect("gateway builds"),
    );
    gw.args([
        "--manifests",
        &manifests.display().to_string(),
        "--region",
        "us-east",
        "--listen",
        &format!("127.0.0.1:{gateway_port}"),
        "--admin-listen",
        &format!("127.0.0.1:{gateway_admin}"),
    ])
    .envs(otel_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    .env("OTEL_BSP_SCHEDULE_DELAY", "200");
    procs.push(c.spawn_process("gateway", gw).expect("gateway starts"));

    // Prometheus with the chart's rules, scraping both every second. The gateway target
    // carries the labels the chart's PodMonitor gives a gateway pod.
    let rules = rules(c);
    std::fs::write(dir.path().join("rules.yaml"), rules.to_string()).expect("rules");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [rules.yaml]\nscrape_configs:\n- job_name: gateways\n  static_configs:\n  - targets: ['127.0.0.1:{gateway_admin}']\n    labels: {{namespace: {ns}, switchyard_dev_pool: chat, switchyard_dev_region: us-east}}\n- job_name: operator\n  static_configs:\n  - targets: ['127.0.0.1:{operator_port}']\n",
            ns = ns.name()
        ),
    )
    .expect("config");
    let mut prom = Command::new("prometheus");
    prom.args([
        &format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ),
        &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
        &format!("--web.listen-address=127.0.0.1:{prometheus_port}"),
    ])
    .current_dir(dir.path());
    procs.push(
        c.spawn_process("prometheus", prom)
            .expect("prometheus starts"),
    );
    let prometheus = format!("http://127.0.0.1:{prometheus_port}");

    let chat = |n: usize| {
        for _ in 0..n {
            curl(&[
                "-XPOST",
                &format!("http://127.0.0.1:{gateway_port}/v1/chat/completions"),
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
            ])
            .expect("the gateway answers");
        }
    };
    wait_for("the gateway to be ready", Duration::from_secs(20), || {
        curl(&[&format!("http://127.0.0.1:{gateway_port}/readyz")])
    });
    wait_for(
        "both targets up in Prometheus",
        Duration::from_secs(60),
        || {
            let targets = api(&prometheus, "/api/v1/targets")?;
            let up = targets["activeTargets"]
                .as_array()?
                .iter()
                .filter(|t| t["health"] == "up")
                .count();
            (up == 2).then_some(())
        },
    );
    // Rates need traffic while Prometheus watches: some healthy seconds first.
    for _ in 0..3 {
        chat(2);
        std::thread::sleep(Duration::from_secs(1));
    }
    // An outage of alpha: every request is rescued by beta, and alpha is ejected.
    fault(alpha, "status:503");
    let pending = wait_for(
        "the failover and ejection alerts to go pending",
        Duration::from_secs(60),
        || {
            chat(2);
            let alerts = api(&prometheus, "/api/v1/alerts")?;
            let names: BTreeSet<String> = alerts["alerts"]
                .as_array()?
                .iter()
                .filter(|a| a["state"] == "pending" || a["state"] == "firing")
                .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_owned))
                .collect();
            (names.contains("SwitchyardFallbackShareHigh")
                && names.contains("SwitchyardProviderEjected"))
            .then_some(names)
        },
    );
    assert!(
        !pending.contains("SwitchyardGatewayErrorRate"),
        "every request was rescued, so no error-rate alert: {pending:?}"
    );

    // The outage's requests as traces: a request span with the GenAI attributes, and
    // under it the failed try of alpha (with why it was failed over) and beta's answer.
    let (request, tries) = wait_for(
        "a rescued request's spans at the OTLP receiver",
        Duration::from_secs(30),
        || {
            let spans: Vec<Value> = std::fs::read_to_string(spans_file.path())
                .ok()?
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            spans.iter().find_map(|server| {
                let tries: Vec<Value> = spans
                    .iter()
                    .filter(|s| s["parent_span_id"] == server["span_id"])
                    .cloned()
                    .collect();
                (server["kind"] == "server"
                    && server["attributes"]["switchyard.attempts"] == 2
                    && tries.len() == 2)
                    .then(|| (server.clone(), tries))
            })
        },
    );
    let a = &request["attributes"];
    assert_eq!(a["gen_ai.operation.name"], "chat", "{request}");
    assert_eq!(a["gen_ai.request.model"], "gpt-4o");
    assert_eq!(a["gen_ai.response.model"], "gpt-4o");
    assert_eq!(a["switchyard.provider"], "beta");
    assert!(a["gen_ai.usage.input_tokens"].as_i64() > Some(0));
    assert!(a["gen_ai.usage.output_tokens"].as_i64() > Some(0));
    let resource = &request["resource"];
    assert_eq!(resource["switchyard.pool"], "chat", "{resource}");
    assert_eq!(resource["switchyard.region"], "us-east");
    assert_eq!(resource["k8s.namespace.name"], ns.name());
    assert_eq!(resource["k8s.pod.name"], "chat-us-east-0");
    let failed = tries
        .iter()
        .find(|t| t["attributes"]["switchyard.provider"] == "alpha")
        .expect("alpha's try");
    assert_eq!(
        failed["attributes"]["error.type"], "server_error",
        "{failed}"
    );
    assert_eq!(
        failed["attributes"]["gen_ai.provider.name"],
        "openai_compatible"
    );
    assert!(
        failed["attributes"]["switchyard.failover.reason"]
            .as_str()
            .is_some_and(|r| r.contains("alpha")),
        "{failed}"
    );

    // Every metric the rules read is scraped, with every label they group by.
    for rule in rules["groups"][0]["rules"].as_array().expect("rules") {
        let expr = rule["expr"].as_str().expect("expr");
        for (metric, labels) in metrics_and_labels(expr) {
            let series = wait_for(
                &format!("series of {metric}"),
                Duration::from_secs(30),
                || {
                    let s = api(&prometheus, &format!("/api/v1/series?match[]={metric}"))?;
                    (!s.as_array()?.is_empty()).then_some(s)
                },
            );
            for label in &labels {
                assert!(
                    series
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|s| s.get(label).is_some()),
                    "{metric} has no series with the label {label} that {} groups by: {series}",
                    rule["alert"]
                );
            }
        }
    }
    // A stream broken mid-answer, so that every series the dashboard shows exists.
    fault(beta, "cut-after:3");
    curl(&[
        "-XPOST",
        &format!("http://127.0.0.1:{gateway_port}/v1/chat/completions"),
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    ]);

    // The dashboard: every panel's query parses, and reads only metrics the gateway and
    // the operator export.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("charts/switchyard/dashboards/switchyard.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 10, "{} panel queries", exprs.len());
    for expr in exprs {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$namespace", ".*");
        for (metric, _) in metrics_and_labels(&expr) {
            wait_for(
                &format!("{metric} (in the dashboard) to be scraped"),
                Duration::from_secs(30),
                || {
                    let s = api(&prometheus, &format!("/api/v1/series?match[]={metric}"))?;
                    (!s.as_array()?.is_empty()).then_some(())
                },
            );
        }
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", "-G", "--data-urlencode"])
            .arg(format!("query={expr}"))
            .arg(format!("{prometheus}/api/v1/query"))
            .output()
            .expect("curl");
        let answer: Value = serde_json::from_slice(&out.stdout).expect("a Prometheus answer");
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
    }

    for mut p in procs {
        let _ = p.kill();
        let _ = p.wait();
    }
}
