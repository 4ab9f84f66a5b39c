//! The real-node tier: the images built here run in real pods on a real kubelet.
//!
//! One cluster for the whole binary: the control plane, kwok nodes for us-west and
//! eu-west, and a real node (containerd, runc, bridge CNI, kube-proxy, CoreDNS) for
//! us-east. The chart is installed with the locally built images; the operator runs in a
//! pod; a pool in us-east gets gateway pods that read their ConfigMap and Secrets through
//! the API, and a client pod reaches them by their Service's DNS name. Two fake providers
//! run on the node's bridge address behind selector-less Services, so the gateways
//! resolve them through cluster DNS too.
//!
//! The zero-drop test runs a steady load from a client pod through each routine operation
//! and fails on a single failed request; the p99 of each run is written to
//! `target/realnode-rollouts.json` for BENCHMARKS.md.

use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use harness::node::{NODE_IP, NODE_NAME};
use harness::{Cluster, Options, images, repo_root, workspace_binary};
use serde_json::Value;

const SYSTEM_NS: &str = "switchyard-system";
const NS: &str = "realnode";
const CLIENT_KEY: &str = "rn-client-key-1";

/// The shared cluster and the two fake providers on the bridge.
struct Env {
    cluster: Cluster,
    primary_port: u16,
    secondary_port: u16,
    _fakes: Vec<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((NODE_IP, 0))
        .expect("a free port on the bridge")
        .local_addr()
        .expect("addr")
        .port()
}

fn env() -> &'static Env {
    static ENV: OnceLock<Result<Env, String>> = OnceLock::new();
    match ENV.get_or_init(|| boot().map_err(|e| format!("{e:#}"))) {
        Ok(env) => env,
        Err(e) => panic!("the real-node tier could not start: {e}"),
    }
}

/// Tests that load the node run one at a time, so one's load does not skew another's
/// numbers.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn boot() -> anyhow::Result<Env> {
    let built = images::build()?;
    let cluster = Cluster::start_with(Options { real_node: true })?;
    match try_install(&cluster, &built) {
        Ok((primary_port, secondary_port, fakes)) => Ok(Env {
            cluster,
            primary_port,
            secondary_port,
            _fakes: fakes,
        }),
        Err(e) => {
            cluster.keep_logs();
            Err(e.context(cluster.diagnose()))
        }
    }
}

fn try_install(
    cluster: &Cluster,
    built: &images::Images,
) -> anyhow::Result<(u16, u16, Vec<Child>)> {
    for archive in built.all() {
        cluster.import_image(archive)?;
    }
    let fake = workspace_binary("fake-provider", "fake-provider")?;
    let mut fakes = Vec::new();
    let (primary_port, secondary_port) = (free_port(), free_port());
    for (name, port) in [("primary", primary_port), ("secondary", secondary_port)] {
        let mut cmd = Command::new(&fake);
        cmd.args(["--listen", &format!("{NODE_IP}:{port}"), "--name", name]);
        fakes.push(cluster.spawn_process(&format!("fake-{name}"), cmd)?);
    }

    images::install_chart(cluster, &[NS])?;
    apply(cluster, &objects(primary_port, secondary_port))?;
    Ok((primary_port, secondary_port, fakes))
}

fn apply(c: &Cluster, yaml: &str) -> anyhow::Result<()> {
    let (ok, _, err) = c.kubectl_input(&["apply", "-f", "-"], yaml)?;
    anyhow::ensure!(ok, "kubectl apply failed: {err}");
    Ok(())
}

/// The fake providers' Services (addressed by DNS name from the gateways), the Secrets,
/// a pool with two gateways on the real node, and a policy that routes `m` to the
/// primary and fails over to the secondary.
fn objects(primary: u16, secondary: u16) -> String {
    let mut out = String::new();
    for (name, port) in [("primary", primary), ("secondary", secondary)] {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: fake-{name}, namespace: {NS}}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: {port}, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: fake-{name}\n  namespace: {NS}\n  labels: {{kubernetes.io/service-name: fake-{name}}}\naddressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\nendpoints: [{{addresses: ['{NODE_IP}']}}]\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: fake-{name}, namespace: {NS}}}\nstringData: {{apiKey: rn-provider-key-{name}}}\n"
        ));
    }
    out.push_str(&format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: clients, namespace: {NS}}}\nstringData: {{loadgen: {CLIENT_KEY}}}\n---\napiVersion: switchyard.dev/v1alpha1\nkind: ProviderPool\nmetadata: {{name: chat, namespace: {NS}}}\nspec:\n  regions: [{{name: us-east, replicas: 2}}]\n  gateway: {{resources: {{requests: {{cpu: 50m, memory: 32Mi}}, limits: {{memory: 128Mi}}}}}}\n  providers:\n  - {{name: primary, type: openaiCompatible, endpoint: 'http://fake-primary.{NS}.svc.cluster.local', region: us-east, credentials: {{secretRef: {{name: fake-primary, key: apiKey}}}}, models: [{{name: m}}]}}\n  - {{name: secondary, type: openaiCompatible, endpoint: 'http://fake-secondary.{NS}.svc.cluster.local', region: us-east, credentials: {{secretRef: {{name: fake-secondary, key: apiKey}}}}, models: [{{name: m}}]}}\n---\napiVersion: switchyard.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {{name: chat, namespace: {NS}}}\nspec:\n  poolRef: {{name: chat}}\n  clientAuth: {{secretRef: {{name: clients}}}}\n  routes: [{{model: m, targets: [{{provider: primary, priority: 0}}, {{provider: secondary, priority: 1}}]}}]\n  timeouts: {{connect: 1s, firstByte: 5s, total: 20s}}\n"
    ));
    out
}

fn wait(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn pool_ready(c: &Cluster) -> bool {
    c.get(
        "providerpool/chat",
        NS,
        "{.status.conditions[?(@.type==\"Ready\")].status}",
    )
    .is_ok_and(|s| s == "True")
}

/// Starts the test kit in a pod on the real node running `command`.
fn start_pod(c: &Cluster, name: &str, command: &[&str]) {
    let cmd: Vec<String> = command.iter().map(|a| format!("'{a}'")).collect();
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  restartPolicy: Never\n  nodeSelector: {{switchyard.dev/node: real}}\n  securityContext: {{runAsNonRoot: true, runAsUser: 65532}}\n  containers:\n  - name: kit\n    image: {img}\n    imagePullPolicy: Never\n    command: [{cmd}]\n    securityContext: {{readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}\n",
        img = images::TESTKIT,
        cmd = cmd.join(", ")
    );
    let _ = c.kubectl_ok(&[
        "delete",
        "pod",
        name,
        "-n",
        NS,
        "--ignore-not-found",
        "--wait",
    ]);
    apply(c, &pod).expect("client pod");
}

fn pod_phase(c: &Cluster, name: &str) -> String {
    c.get(&format!("pod/{name}"), NS, "{.status.phase}")
        .unwrap_or_default()
}

/// Waits for a test-kit pod to finish and returns the last line of its output as JSON.
fn finish_pod(c: &Cluster, name: &str, timeout: Duration) -> Value {
    wait(&format!("pod {name} to finish"), timeout, || {
        matches!(pod_phase(c, name).as_str(), "Succeeded" | "Failed")
    });
    let logs = c
        .kubectl_ok(&["logs", name, "-n", NS])
        .expect("pod logs through the kubelet");
    let last = logs.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("pod {name} printed no JSON ({e}):\n{logs}"))
}

/// Runs the test kit in a pod on the real node and returns its JSON summary.
fn run_pod(c: &Cluster, name: &str, command: &[&str], timeout: Duration) -> Value {
    start_pod(c, name, command);
    finish_pod(c, name, timeout)
}

fn fake_fault(port: u16, spec: &str) {
    let out = Command::new("curl")
        .args(["-sf", "-X", "POST", "-H", "content-type: application/json"])
        .args(["-d", &format!("{{\"fault\": \"{spec}\"}}")])
        .arg(format!("http://{NODE_IP}:{port}/admin/faults"))
        .stdout(Stdio::null())
        .status()
        .expect("curl");
    assert!(out.success(), "setting fault {spec} on port {port}");
}

fn fake_clear(port: u16) {
    let _ = Command::new("curl")
        .args(["-sf", "-X", "DELETE"])
        .arg(format!("http://{NODE_IP}:{port}/admin/faults"))
        .stdout(Stdio::null())
        .status();
}

fn fake_attempts(port: u16) -> usize {
    let out = Command::new("curl")
        .args(["-sf"])
        .arg(format!("http://{NODE_IP}:{port}/admin/attempts"))
        .output()
        .expect("curl");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array().map_or(0, Vec::len)
}

const GATEWAY_URL: &str = "http://chat-us-east.realnode.svc.cluster.local:8080";

fn loadgen(rate: u32, seconds: u32) -> Vec<String> {
    [
        "/loadgen",
        "--url",
        GATEWAY_URL,
        "--rate",
        &rate.to_string(),
        "--seconds",
        &seconds.to_string(),
        "--key",
        CLIENT_KEY,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn pods_resolve_services_by_cluster_dns_name() {
    let e = env();
    let out = run_pod(
        &e.cluster,
        "resolve-api",
        &[
            "/loadgen",
            "--resolve",
            "kubernetes.default.svc.cluster.local",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out["addresses"], serde_json::json!(["10.96.0.1"]), "{out}");
    let svc_ip = e
        .cluster
        .get("svc/fake-primary", NS, "{.spec.clusterIP}")
        .expect("service");
    let out = run_pod(
        &e.cluster,
        "resolve-fake",
        &[
            "/loadgen",
            "--resolve",
            "fake-primary.realnode.svc.cluster.local",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out["addresses"], serde_json::json!([svc_ip]), "{out}");
}

#[test]
fn operator_pod_makes_gateway_pods_that_serve_by_dns_name_and_fail_over() {
    let e = env();
    let _serial = serial();
    let c = &e.cluster;
    wait("pool chat Ready", Duration::from_secs(180), || {
        pool_ready(c)
    });

    // The operator and both gateways are real containers on the real node.
    let pods = c
        .kubectl_ok(&["get", "pods", "-A", "-o", "json"])
        .expect("pods");
    let pods: Value = serde_json::from_str(&pods).expect("json");
    let on_node: Vec<&Value> = pods["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|p| p["spec"]["nodeName"] == NODE_NAME)
        .collect();
    let gateways: Vec<&&Value> = on_node
        .iter()
        .filter(|p| {
            p["metadata"]["namespace"] == NS
                && p["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("chat-us-east-"))
        })
        .filter(|p| p["status"]["phase"] == "Running")
        .collect();
    assert_eq!(
        gateways.len(),
        2,
        "two running gateway pods on the real node"
    );
    for g in &gateways {
        let ip = g["status"]["podIP"].as_str().unwrap_or_default();
        assert!(
            ip.starts_with("10.88.0."),
            "gateway pod IP {ip} is on the bridge"
        );
        assert_eq!(g["spec"]["containers"][0]["image"], images::GATEWAY);
    }
    assert!(
        on_node
            .iter()
            .any(|p| p["metadata"]["namespace"] == SYSTEM_NS && p["status"]["phase"] == "Running"),
        "the operator runs in a pod on the real node"
    );

    // A client pod reaches the gateways through their Service's DNS name.
    fake_clear(e.primary_port);
    let before = fake_attempts(e.primary_port);
    let out = run_pod(
        c,
        "client-ok",
        &as_strs(&loadgen(20, 5)),
        Duration::from_secs(90),
    );
    assert_eq!(out["failed"], 0, "{out}");
    assert_eq!(out["ok"], 100, "{out}");
    assert!(
        fake_attempts(e.primary_port) >= before + 100,
        "the primary served them"
    );

    // The primary breaks: every request is still answered, by the secondary.
    fake_fault(e.primary_port, "status:503");
    let secondary_before = fake_attempts(e.secondary_port);
    let out = run_pod(
        c,
        "client-failover",
        &as_strs(&loadgen(20, 5)),
        Duration::from_secs(90),
    );
    fake_clear(e.primary_port);
    assert_eq!(out["failed"], 0, "{out}");
    assert!(
        fake_attempts(e.secondary_port) >= secondary_before + 100,
        "the secondary answered while the primary failed"
    );

    // The gateways publish what they saw into the pool's status.
    wait(
        "the primary's health in the pool status",
        Duration::from_secs(60),
        || {
            c.get(
                "providerpool/chat",
                NS,
                "{.status.regions[?(@.name==\"us-east\")].providers[?(@.name==\"primary\")].state}",
            )
            .is_ok_and(|s| s == "Ejected" || s == "Degraded")
        },
    );
}

/// Waits until `deployment` in `ns` has all its replicas updated and available, and no
/// old one left.
fn settled(c: &Cluster, ns: &str, deployment: &str) -> bool {
    c.get(
        &format!("deployment/{deployment}"),
        ns,
        "{.spec.replicas} {.status.updatedReplicas} {.status.availableReplicas} {.status.replicas}",
    )
    .is_ok_and(|s| {
        let v: Vec<&str> = s.split_whitespace().collect();
        v.len() == 4 && v.iter().all(|x| *x == v[0])
    })
}

fn gateway_pods(c: &Cluster) -> Vec<String> {
    c.names("pods", NS, "switchyard.dev/pool=chat")
}

/// A routine operation and how to tell it is over.
type Operation = fn(&Cluster);

fn rolling_restart(c: &Cluster) {
    let before = gateway_pods(c);
    assert_eq!(
        before.len(),
        2,
        "two gateway pods before the restart: {before:?}"
    );
    c.kubectl_ok(&["rollout", "restart", "deployment/chat-us-east", "-n", NS])
        .expect("rollout restart");
    c.kubectl_ok(&[
        "rollout",
        "status",
        "deployment/chat-us-east",
        "-n",
        NS,
        "--timeout=120s",
    ])
    .expect("rollout finishes");
    // Done when every old pod is gone, not only when the new ones are available: the old
    // ones' shutdown is what could drop requests.
    let rolled = Instant::now();
    wait(
        "the old gateway pods to exit",
        Duration::from_secs(120),
        || {
            let now = gateway_pods(c);
            now.len() == 2 && before.iter().all(|p| !now.contains(p))
        },
    );
    eprintln!(
        "[realnode] rollout status returned; the old pods were gone {:.1}s later",
        rolled.elapsed().as_secs_f64()
    );
}

fn delete_gateway_pod(c: &Cluster) {
    let pods = gateway_pods(c);
    let victim = pods.first().expect("a gateway pod");
    c.kubectl_ok(&["delete", "pod", victim, "-n", NS, "--wait=false"])
        .expect("delete pod");
    wait(
        "the gateway Deployment to heal",
        Duration::from_secs(120),
        || !gateway_pods(c).contains(victim) && settled(c, NS, "chat-us-east"),
    );
}

fn change_config(c: &Cluster) {
    let revision = || {
        c.get("configmap/chat-us-east", NS, "{.metadata.annotations}")
            .unwrap_or_default()
    };
    let before = revision();
    c.kubectl_ok(&[
        "patch",
        "routingpolicy",
        "chat",
        "-n",
        NS,
        "--type=merge",
        "-p",
        "{\"spec\":{\"timeouts\":{\"total\":\"25s\"}}}",
    ])
    .expect("patch the policy");
    wait("the new config", Duration::from_secs(60), || {
        revision() != before
    });
    wait(
        "the gateway Deployment to settle",
        Duration::from_secs(120),
        || settled(c, NS, "chat-us-east"),
    );
}

fn kill_operator_pod(c: &Cluster) {
    let leader = c
        .kubectl_ok(&[
            "get",
            "lease",
            "-n",
            SYSTEM_NS,
            "-o",
            "jsonpath={.items[*].spec.holderIdentity}",
        ])
        .expect("the operator's lease");
    let leader = leader
        .split_whitespace()
        .next()
        .expect("a leader")
        .to_owned();
    c.kubectl_ok(&[
        "delete",
        "pod",
        &leader,
        "-n",
        SYSTEM_NS,
        "--grace-period=0",
        "--force",
    ])
    .expect("kill the leading operator pod");
    wait("the operator to heal", Duration::from_secs(120), || {
        settled(c, SYSTEM_NS, "switchyard")
    });
}

#[test]
fn routine_operations_drop_no_client_request() {
    const RATE: u32 = 200;
    const SECONDS: u32 = 40;
    let e = env();
    let _serial = serial();
    let c = &e.cluster;
    wait("pool chat Ready", Duration::from_secs(180), || {
        pool_ready(c)
    });
    wait("both gateways available", Duration::from_secs(120), || {
        settled(c, NS, "chat-us-east")
    });
    fake_clear(e.primary_port);
    fake_clear(e.secondary_port);
    let operations: [(&str, Operation); 4] = [
        ("rolling restart of the region's gateways", rolling_restart),
        ("one gateway pod deleted", delete_gateway_pod),
        ("routing policy changed", change_config),
        ("leading operator pod killed", kill_operator_pod),
    ];
    let path = repo_root().join("target/realnode-rollouts.json");
    let _ = std::fs::remove_file(&path);
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (i, (what, operation)) in operations.iter().enumerate() {
        let pod = format!("load-{i}");
        start_pod(c, &pod, &as_strs(&loadgen(RATE, SECONDS)));
        wait(
            &format!("pod {pod} to run"),
            Duration::from_secs(60),
            || pod_phase(c, &pod) == "Running",
        );
        // A few seconds of steady state first, so the operation meets a warm client.
        std::thread::sleep(Duration::from_secs(5));
        let started = Instant::now();
        operation(c);
        let took = started.elapsed();
        let out = finish_pod(c, &pod, Duration::from_secs(u64::from(SECONDS) + 60));
        eprintln!(
            "[realnode] {what}: took {:.1}s, load {out}",
            took.as_secs_f64()
        );
        // The operation, then the old pods' shutdown delay, must end while load still runs.
        if took + Duration::from_secs(5 + 8) > Duration::from_secs(u64::from(SECONDS)) {
            failures.push(format!(
                "{what} took {took:?}: too long to be measured under a {SECONDS} s load"
            ));
        }
        if out["failed"] != 0 || out["ok"] != u64::from(RATE * SECONDS) {
            failures.push(format!("{what}: {out}"));
        }
        report.push(serde_json::json!({
            "operation": what,
            "seconds": took.as_secs_f64(),
            "load": out,
        }));
    }
    let _ = std::fs::write(
        &path,
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    );
    assert!(
        failures.is_empty(),
        "client requests failed:\n{}",
        failures.join("\n")
    );
}
