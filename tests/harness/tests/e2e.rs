//! End-to-end tests on the real local control plane: the CRDs from the chart, the
//! examples, and the invalid-manifest corpus, all through kubectl.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use harness::{Cluster, REGIONS, repo_root};

fn cluster() -> &'static Cluster {
    let cluster = Cluster::shared();
    static CRDS: OnceLock<()> = OnceLock::new();
    CRDS.get_or_init(|| {
        let crds = repo_root().join("charts/switchyard/crds");
        cluster
            .kubectl_ok(&["apply", "--server-side", "-f", &crds.display().to_string()])
            .expect("the chart's CRDs install");
        cluster
            .kubectl_ok(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/providerpools.switchyard.dev",
                "crd/routingpolicies.switchyard.dev",
            ])
            .expect("CRDs become established");
    });
    cluster
}

fn corpus() -> Vec<(String, String, String)> {
    let dir = repo_root().join("examples/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("corpus")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("readable");
            let expect = text
                .lines()
                .find_map(|l| l.strip_prefix("# expect: "))
                .expect("expect line")
                .to_owned();
            (
                path.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_owned(),
                expect,
                text,
            )
        })
        .collect()
}

#[test]
fn kwok_nodes_carry_the_three_regions_and_zones() {
    let c = cluster();
    let out = c
        .kubectl_ok(&["get", "nodes", "-o", "jsonpath={range .items[*]}{.metadata.labels.topology\\.kubernetes\\.io/region}/{.metadata.labels.topology\\.kubernetes\\.io/zone}{\"\\n\"}{end}"])
        .expect("nodes");
    for region in REGIONS {
        assert!(
            out.contains(&format!("{region}/{region}-a"))
                && out.contains(&format!("{region}/{region}-b")),
            "{out}"
        );
    }
}

#[test]
fn kubectl_explain_prints_the_field_docs() {
    let c = cluster();
    // The OpenAPI document kubectl explain reads is published a moment after the CRD.
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        match c.kubectl_ok(&["explain", "providerpools.spec.providers.credentials"]) {
            Ok(out) => break out,
            Err(e) if Instant::now() > deadline => panic!("kubectl explain never worked: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    assert!(out.contains("Where the API key lives"), "{out}");
    assert!(out.contains("secretRef"), "{out}");
    let out = c
        .kubectl_ok(&["explain", "routingpolicies.spec.retry.budget"])
        .expect("explain works");
    assert!(
        out.contains("so retries cannot multiply an outage"),
        "{out}"
    );
}

#[test]
fn the_api_server_rejects_every_invalid_manifest_with_its_message() {
    let c = cluster();
    let ns = c.namespace("invalid").expect("namespace");
    let mut failures = Vec::new();
    for (file, expect, text) in corpus() {
        let (ok, _, stderr) = c
            .kubectl_input(&["apply", "-n", ns.name(), "-f", "-"], &text)
            .expect("kubectl runs");
        if ok {
            failures.push(format!(
                "{file}: accepted, expected rejection with {expect:?}"
            ));
        } else if !stderr.contains(&expect) {
            failures.push(format!(
                "{file}: expected {expect:?} in:\n{}",
                stderr.trim()
            ));
        } else if stderr.contains("type conversion error") {
            // A rule tripping over a value the schema already refused: noise beside the
            // clear message.
            failures.push(format!(
                "{file}: a confusing CEL error beside {expect:?}:\n{}",
                stderr.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} corpus cases misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_examples_are_accepted_and_listed_with_their_printer_columns() {
    let c = cluster();
    let examples = repo_root().join("examples");
    for file in [
        "00-namespace.yaml",
        "10-secrets.yaml",
        "20-providerpool.yaml",
        "30-routingpolicy.yaml",
    ] {
        c.kubectl_ok(&["apply", "-f", &examples.join(file).display().to_string()])
            .unwrap_or_else(|e| panic!("{file} is accepted: {e}"));
    }
    let pools = c
        .kubectl_ok(&["get", "providerpools", "-n", "ai-platform"])
        .expect("get");
    let header: Vec<&str> = pools
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "REGIONS", "PROVIDERS", "READY", "AGE"],
        "{pools}"
    );
    assert!(pools.contains("chat"));
    let policies = c
        .kubectl_ok(&["get", "rp", "-n", "ai-platform"])
        .expect("get by short name");
    let header: Vec<&str> = policies
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "POOL", "ROUTES", "ACCEPTED", "AGE"],
        "{policies}"
    );
    assert!(
        policies
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("chat") && l.contains(" chat ")),
        "{policies}"
    );
    let all = c
        .kubectl_ok(&["get", "switchyard", "-n", "ai-platform", "-o", "name"])
        .expect("category");
    assert!(
        all.contains("providerpool.switchyard.dev/chat")
            && all.contains("routingpolicy.switchyard.dev/chat"),
        "{all}"
    );
}

#[test]
fn the_api_server_applies_the_documented_defaults() {
    let c = cluster();
    let ns = c.namespace("defaults").expect("namespace");
    let policy = "apiVersion: switchyard.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {name: minimal}\nspec:\n  poolRef: {name: chat}\n  routes: [{model: gpt-4o, targets: [{provider: openai}]}]\n";
    let (ok, _, stderr) = c
        .kubectl_input(&["apply", "-n", ns.name(), "-f", "-"], policy)
        .expect("kubectl");
    assert!(ok, "{stderr}");
    let json = c
        .kubectl_ok(&[
            "get",
            "routingpolicy",
            "minimal",
            "-n",
            ns.name(),
            "-o",
            "json",
        ])
        .expect("get");
    let stored: serde_json::Value = serde_json::from_str(&json).expect("json");
    let spec = &stored["spec"];
    assert_eq!(spec["retry"]["attempts"], 3);
    assert_eq!(spec["retry"]["backoff"]["initial"], "100ms");
    assert_eq!(spec["retry"]["backoff"]["max"], "30s");
    assert_eq!(spec["retry"]["budget"], 0.2);
    assert_eq!(
        spec["retry"]["retryOn"]["statusCodes"],
        serde_json::json!([429, 500, 502, 503, 504])
    );
    assert_eq!(spec["circuitBreaker"]["minRequests"], 20);
    assert_eq!(spec["regional"], "preferLocal");
    assert_eq!(spec["routes"][0]["strategy"], "weighted");
    // What the server stored reads back into the Rust types unchanged.
    let typed: crds::RoutingPolicy = serde_json::from_value(stored.clone()).expect("typed");
    assert_eq!(typed.spec.retry, crds::policy::RetryPolicy::default());
}

#[test]
fn pods_land_on_their_regions_nodes_and_reach_running() {
    let c = cluster();
    let ns = c.namespace("placement").expect("namespace");
    for region in REGIONS {
        let deploy = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: probe-{region}}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: probe-{region}}}}}\n  template:\n    metadata: {{labels: {{app: probe-{region}}}}}\n    spec:\n      nodeSelector: {{topology.kubernetes.io/region: {region}}}\n      containers: [{{name: c, image: example.invalid/none}}]\n"
        );
        let (ok, _, stderr) = c
            .kubectl_input(&["apply", "-n", ns.name(), "-f", "-"], &deploy)
            .expect("kubectl");
        assert!(ok, "{stderr}");
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let out = c
            .kubectl_ok(&["get", "pods", "-n", ns.name(), "-o", "jsonpath={range .items[*]}{.metadata.labels.app} {.spec.nodeName} {.status.phase}{\"\\n\"}{end}"])
            .expect("pods");
        let rows: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let running = rows
            .iter()
            .filter(|r| r.len() == 3 && r[2] == "Running")
            .count();
        if running == 2 * REGIONS.len() {
            for r in &rows {
                let region = r[0].trim_start_matches("probe-");
                assert!(
                    r[1].starts_with(&format!("kwok-{region}-")),
                    "pod of {region} on {}",
                    r[1]
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pods did not reach Running: {out}\nlogs: {}",
            c.logs_dir().display()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A failing test must say where the component logs are. Runs a deliberately failing
/// test in a child process (with its own cluster) and checks its output.
#[test]
fn a_failing_test_points_to_the_component_logs() {
    if std::env::var_os("SWITCHYARD_DELIBERATE_FAILURE").is_some() {
        let c = Cluster::shared();
        let _ns = c.namespace("deliberate").expect("namespace");
        panic!("deliberate failure to check the log pointer");
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_failing_test_points_to_the_component_logs",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SWITCHYARD_DELIBERATE_FAILURE", "1")
        .output()
        .expect("child test runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the deliberate failure failed to fail:\n{text}"
    );
    let kept = text
        .lines()
        .find_map(|l| l.split("control plane logs kept in ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no log pointer in the output:\n{text}"));
    assert!(
        kept.join("kube-apiserver.log").is_file(),
        "{} holds the logs",
        kept.display()
    );
    // The reaper stops the child's components; remove what it kept for us to inspect.
    let dir = kept.parent().map(PathBuf::from).expect("cluster dir");
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.join("pids").exists() && Instant::now() < deadline {
        let pids = std::fs::read_to_string(dir.join("pids")).unwrap_or_default();
        let alive = pids
            .lines()
            .any(|p| std::path::Path::new(&format!("/proc/{}", p.trim())).exists());
        if !alive {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A controller-manager that dies is started again, as a kubelet restarts a static pod,
/// and the cluster keeps working: a new namespace still gets its ServiceAccount.
#[test]
fn a_controller_manager_that_exits_is_started_again() {
    let c = Cluster::start().expect("a control plane of its own");
    let pid = c
        .component_pid("kube-controller-manager")
        .expect("the controller-manager runs");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    // Creating a namespace waits for its default ServiceAccount, which only a running
    // controller-manager creates.
    let ns = c
        .namespace("after-restart")
        .expect("the cluster still works");
    assert_ne!(
        c.component_pid("kube-controller-manager"),
        Some(pid),
        "a new controller-manager process serves"
    );
    assert!(
        c.logs_dir().join("kube-controller-manager.1.log").is_file(),
        "the dead process's log is kept beside the new one"
    );
    drop(ns);
}

#[test]
fn kind_config_has_the_same_regions_as_the_local_control_plane() {
    let text =
        std::fs::read_to_string(repo_root().join("kind-config.yaml")).expect("kind-config.yaml");
    let config: serde_json::Value = serde_norway::from_str(&text).expect("valid YAML");
    let regions: Vec<&str> = config["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["labels"]["topology.kubernetes.io/region"].as_str())
        .collect();
    assert_eq!(regions, REGIONS);
}
