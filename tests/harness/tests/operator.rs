//! The operator against the real local control plane: examples in, regional gateways and
//! truthful status out.

use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use harness::{Cluster, REGIONS, repo_root, workspace_binary};
use serde_json::Value;

/// The cluster with the CRDs installed and one operator running for every test.
static OPERATOR: OnceLock<Mutex<Child>> = OnceLock::new();

fn start_operator(c: &Cluster) -> Child {
    let bin =
        workspace_binary("switchyard-operator", "switchyard-operator").expect("operator builds");
    let mut cmd = Command::new(bin);
    cmd.args([
        "--gateway-image",
        "switchyard-gateway:e2e",
        "--metrics-listen",
        "127.0.0.1:0",
        "--leader-election-namespace",
        "default",
    ]);
    c.spawn_process("switchyard-operator", cmd)
        .expect("operator starts")
}

fn cluster() -> &'static Cluster {
    static READY: OnceLock<()> = OnceLock::new();
    let c = Cluster::shared();
    READY.get_or_init(|| {
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
            "crd/routingpolicies.switchyard.dev",
        ])
        .expect("CRDs established");
        // Kept, never waited here: the cluster's reaper stops it with the control plane.
        OPERATOR.get_or_init(|| Mutex::new(start_operator(c)));
    });
    c
}

fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; logs in {}",
            Cluster::shared().logs_dir().display()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Waits until `resource` (kind/name) in `ns` has condition `type_` with `status`, and
/// returns the object.
fn wait_condition(
    c: &Cluster,
    ns: &str,
    resource: &str,
    type_: &str,
    status: &str,
    timeout: Duration,
) -> Value {
    let (kind, name) = resource.split_once('/').expect("kind/name");
    wait_for(&format!("{resource} {type_}={status}"), timeout, || {
        let obj = get_json(c, &[kind, name, "-n", ns])?;
        (condition(&obj, type_)?.0 == status).then_some(obj)
    })
}

fn get_json(c: &Cluster, args: &[&str]) -> Option<Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    c.kubectl_ok(&all)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
}

fn condition(obj: &Value, type_: &str) -> Option<(String, String, String)> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
                c["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

#[test]
fn the_examples_become_ready_gateways_in_every_region() {
    let c = cluster();
    for file in [
        "00-namespace.yaml",
        "10-secrets.yaml",
        "20-providerpool.yaml",
        "30-routingpolicy.yaml",
    ] {
        c.kubectl_ok(&[
            "apply",
            "-f",
            &repo_root()
                .join("examples")
                .join(file)
                .display()
                .to_string(),
        ])
        .expect("applies");
    }
    let ns = "ai-platform";
    let pool = wait_condition(
        c,
        ns,
        "providerpool/chat",
        "Ready",
        "True",
        Duration::from_secs(90),
    );
    assert_eq!(pool["status"]["readyRegions"], "3/3");
    assert_eq!(
        pool["status"]["observedGeneration"],
        pool["metadata"]["generation"]
    );
    for region in REGIONS {
        let pods = get_json(
            c,
            &[
                "pods",
                "-n",
                ns,
                "-l",
                &format!("switchyard.dev/region={region}"),
            ],
        )
        .expect("pods");
        let pods = pods["items"].as_array().cloned().unwrap_or_default();
        assert_eq!(pods.len(), 2, "two replicas in {region}");
        for pod in pods {
            assert!(
                pod["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(&format!("kwok-{region}-")),
                "{region}: {}",
                pod["spec"]["nodeName"]
            );
            assert_eq!(pod["status"]["phase"], "Running");
        }
        let cm =
            get_json(c, &["configmap", &format!("chat-{region}"), "-n", ns]).expect("configmap");
        let config: crds::GatewayConfig =
            serde_json::from_str(cm["data"]["gateway.json"].as_str().expect("config"))
                .expect("valid config");
        assert_eq!(config.region, region);
        assert!(
            !cm.to_string().contains("demo-openai-key"),
            "no secret value in a ConfigMap"
        );
    }
    let policy = wait_condition(
        c,
        ns,
        "routingpolicy/chat",
        "Accepted",
        "True",
        Duration::from_secs(30),
    );
    assert_eq!(
        condition(&policy, "ResolvedRefs").map(|c| c.0).as_deref(),
        Some("True")
    );
    let table = c
        .kubectl_ok(&["get", "providerpools,routingpolicies", "-n", ns])
        .expect("get");
    assert!(table.contains("3/3") && table.contains("True"), "{table}");
    assert!(
        table.contains("gpt-4o,gpt-4o-mini,llama-3.1-8b,claude-sonnet"),
        "{table}"
    );
}

fn small_pool(c: &Cluster, ns: &str, regions: &[&str]) {
    let regions: Vec<String> = regions
        .iter()
        .map(|r| format!("{{name: {r}, replicas: 1}}"))
        .collect();
    let manifest = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: key}}\nstringData: {{apiKey: k}}\n---\n\
apiVersion: switchyard.dev/v1alpha1\nkind: ProviderPool\nmetadata: {{name: small}}\nspec:\n  regions: [{}]\n  providers:\n  - {{name: p, type: openai, endpoint: 'https://api.openai.com', region: us-east, credentials: {{secretRef: {{name: key}}}}, models: [{{name: m}}]}}\n---\n\
apiVersion: switchyard.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {{name: small}}\nspec:\n  poolRef: {{name: small}}\n  routes: [{{model: m, targets: [{{provider: p}}]}}]\n",
        regions.join(", ")
    );
    let (ok, _, err) = c
        .kubectl_input(&["apply", "-n", ns, "-f", "-"], &manifest)
        .expect("kubectl");
    assert!(ok, "{err}");
}

#[test]
fn deleting_a_providers_secret_turns_resolved_refs_false_naming_it() {
    let c = cluster();
    let ns = c.namespace("refs").expect("namespace");
    small_pool(c, ns.name(), &["us-east"]);
    wait_condition(
        c,
        ns.name(),
        "routingpolicy/small",
        "ResolvedRefs",
        "True",
        Duration::from_secs(60),
    );
    c.kubectl_ok(&["delete", "secret", "key", "-n", ns.name()])
        .expect("delete");
    let (_, reason, message) = resolved_refs_false(c, ns.name());
    assert_eq!(reason, "SecretNotFound");
    assert!(
        message.contains("Secret \"key\" not found")
            && message.contains("spec.providers[0].credentials.secretRef"),
        "{message}"
    );
    // The pool says so too: its provider cannot be used.
    let pool = wait_condition(
        c,
        ns.name(),
        "providerpool/small",
        "Degraded",
        "True",
        Duration::from_secs(60),
    );
    let (_, reason, message) = condition(&pool, "Degraded").expect("condition");
    assert_eq!(reason, "SecretNotFound");
    assert!(
        message.contains("spec.providers[0].credentials.secretRef: Secret \"key\" not found")
            && message.contains("provider \"p\" cannot be used"),
        "{message}"
    );
}

/// Waits for policy `small` to report ResolvedRefs=False; its (status, reason, message).
fn resolved_refs_false(c: &Cluster, ns: &str) -> (String, String, String) {
    let policy = wait_condition(
        c,
        ns,
        "routingpolicy/small",
        "ResolvedRefs",
        "False",
        Duration::from_secs(60),
    );
    condition(&policy, "ResolvedRefs").expect("the condition just seen")
}

#[test]
fn an_allow_list_naming_an_unknown_client_turns_resolved_refs_false_naming_it() {
    let c = cluster();
    let ns = c.namespace("allow").expect("namespace");
    small_pool(c, ns.name(), &["us-east"]);
    let manifest = "apiVersion: v1\nkind: Secret\nmetadata: {name: clients}\nstringData: {app: k1}\n---\n\
apiVersion: switchyard.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {name: small}\nspec:\n  poolRef: {name: small}\n  routes: [{model: m, targets: [{provider: p}]}]\n  clientAuth: {secretRef: {name: clients}, clients: [{name: app, models: [m]}, {name: ghost, models: [m]}]}\n";
    let (ok, _, err) = c
        .kubectl_input(&["apply", "-n", ns.name(), "-f", "-"], manifest)
        .expect("kubectl");
    assert!(ok, "{err}");
    let (_, _, message) = resolved_refs_false(c, ns.name());
    assert!(
        message.contains("spec.clientAuth.clients[1].name")
            && message.contains("\"ghost\"")
            && !message.contains("clients[0]"),
        "{message}"
    );
}

#[test]
fn removing_a_region_removes_exactly_its_objects() {
    let c = cluster();
    let ns = c.namespace("regions").expect("namespace");
    small_pool(c, ns.name(), &["us-east", "eu-west"]);
    let names = |kind: &str| c.names(kind, ns.name(), "switchyard.dev/pool=small");
    wait_for("both regions", Duration::from_secs(60), || {
        (names("deployments").len() == 2).then_some(())
    });
    // Something of the user's that carries a similar name must survive.
    c.kubectl_ok(&[
        "create",
        "configmap",
        "small-eu-west-notes",
        "-n",
        ns.name(),
    ])
    .expect("user configmap");
    c.kubectl_ok(&[
        "patch",
        "providerpool",
        "small",
        "-n",
        ns.name(),
        "--type=json",
        "-p",
        "[{\"op\":\"remove\",\"path\":\"/spec/regions/1\"}]",
    ])
    .expect("patch");
    wait_for("eu-west objects pruned", Duration::from_secs(60), || {
        (names("deployments") == ["small-us-east"]
            && names("configmaps") == ["small-us-east"]
            && names("services") == ["small", "small-us-east"])
        .then_some(())
    });
    c.kubectl_ok(&["get", "configmap", "small-eu-west-notes", "-n", ns.name()])
        .expect("the user's object is untouched");
}

#[test]
fn an_idle_operator_makes_no_writes() {
    let c = cluster();
    let ns = c.namespace("idle").expect("namespace");
    small_pool(c, ns.name(), &["us-east"]);
    wait_condition(
        c,
        ns.name(),
        "providerpool/small",
        "Ready",
        "True",
        Duration::from_secs(60),
    );
    let rv = |kind: &str, name: &str| -> String {
        c.kubectl_ok(&[
            "get",
            kind,
            name,
            "-n",
            ns.name(),
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .unwrap_or_default()
    };
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<String> = [
        ("providerpool", "small"),
        ("routingpolicy", "small"),
        ("deployment", "small-us-east"),
        ("configmap", "small-us-east"),
        ("role", "small-gateway"),
    ]
    .iter()
    .map(|(k, n)| rv(k, n))
    .collect();
    // Touch something the operator watches without changing anything it renders.
    c.kubectl_ok(&["annotate", "secret", "key", "-n", ns.name(), "touched=yes"])
        .expect("annotate");
    std::thread::sleep(Duration::from_secs(5));
    let after: Vec<String> = [
        ("providerpool", "small"),
        ("routingpolicy", "small"),
        ("deployment", "small-us-east"),
        ("configmap", "small-us-east"),
        ("role", "small-gateway"),
    ]
    .iter()
    .map(|(k, n)| rv(k, n))
    .collect();
    assert_eq!(
        before, after,
        "a reconcile with nothing to change wrote to the API server"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port()
}

/// A minimal HTTP/1.0 client: (status, body).
fn http(method: &str, port: u16, path: &str, body: &str) -> Option<(u16, String)> {
    http_with(method, port, path, "", body)
}

/// `http`, with `headers` (complete lines, each ending in CRLF) added to the request.
fn http_with(
    method: &str,
    port: u16,
    path: &str,
    headers: &str,
    body: &str,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned(),
    ))
}

/// A fake provider named `name` on a free loopback port, stopped with the cluster.
fn fake_provider(c: &Cluster, ns: &str, name: &str) -> (Child, u16) {
    let fake = workspace_binary("fake-provider", "fake-provider").expect("fake provider builds");
    let port = free_port();
    let mut cmd = Command::new(&fake);
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--name", name]);
    let child = c
        .spawn_process(&format!("fake-{name}-{ns}"), cmd)
        .expect("fake starts");
    (child, port)
}

/// A provider's (state, reason) in `region` of pool `health`, as its gateways publish it.
fn provider_state(c: &Cluster, ns: &str, region: &str, provider: &str) -> Option<(String, String)> {
    let pool = get_json(c, &["providerpool", "health", "-n", ns])?;
    let regions = pool["status"]["regions"].as_array()?.clone();
    let r = regions.iter().find(|r| r["name"] == region)?;
    let p = r["providers"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == provider)?
        .clone();
    Some((
        p["state"].as_str()?.to_owned(),
        p["reason"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// A gateway of `pool` in `region` on loopback, reading the operator's ConfigMap as the
/// pool's ServiceAccount, exactly as in a pod; returned once it is ready.
fn gateway_process(c: &Cluster, ns: &str, pool: &str, region: &str, port: u16) -> Child {
    let sa = format!("system:serviceaccount:{ns}:{pool}-gateway");
    let groups = [
        "system:serviceaccounts",
        &format!("system:serviceaccounts:{ns}"),
        "system:authenticated",
    ];
    let kubeconfig = c.kubeconfig_as(&sa, &groups).expect("kubeconfig");
    let gw_bin =
        workspace_binary("switchyard-gateway", "switchyard-gateway").expect("gateway builds");
    let mut cmd = Command::new(gw_bin);
    cmd.args([
        "--configmap",
        &format!("{pool}-{region}"),
        "--namespace",
        ns,
        "--region",
        region,
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    cmd.env("KUBECONFIG", &kubeconfig);
    let gateway = c
        .spawn_process(&format!("gateway-{ns}"), cmd)
        .expect("gateway starts");
    wait_for("the gateway to be ready", Duration::from_secs(30), || {
        http("GET", port, "/readyz", "").filter(|(s, _)| *s == 200)
    });
    gateway
}

/// Letters that do not compress much: a text of `len` characters from `seed`.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + u8::try_from(x % 26).expect("< 26"))
        })
        .collect()
}

#[test]
fn a_configuration_too_large_for_plain_json_is_compressed_and_served_by_gateways() {
    let c = cluster();
    let ns = c.namespace("bulky").expect("namespace");
    let ns = ns.name();
    let (mut provider, fake_port) = fake_provider(c, ns, "alpha");
    let gw_port = free_port();
    let mut manifest = format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: ProviderPool\nmetadata: {{name: bulky}}\nspec:\n  regions: [{{name: us-east, replicas: 1}}]\n  providers:\n  - {{name: alpha, type: openaiCompatible, endpoint: 'http://127.0.0.1:{fake_port}', region: us-east, models: [{{name: m}}]}}\n"
    );
    // Four policies of 60 routes, each with a long refusal text: about 400 KB of JSON.
    for n in 0..4u64 {
        let routes: Vec<Value> = (0..60u64)
            .map(|r| {
                serde_json::json!({"model": format!("big-{n}-{r}"),
                    "targets": [{"provider": "alpha", "model": "m"}],
                    "onContentPolicy": {"response": noise(n * 100 + r, 1600)}})
            })
            .collect();
        let policy = serde_json::json!({
            "apiVersion": "switchyard.dev/v1alpha1", "kind": "RoutingPolicy",
            "metadata": {"name": format!("team-{n}")},
            "spec": {"poolRef": {"name": "bulky"}, "routes": routes}});
        manifest.push_str(&format!("---\n{policy}\n"));
    }
    let (ok, _, err) = c
        .kubectl_input(&["apply", "-n", ns, "-f", "-"], &manifest)
        .expect("kubectl");
    assert!(ok, "{err}");
    for n in 0..4 {
        wait_condition(
            c,
            ns,
            &format!("routingpolicy/team-{n}"),
            "Accepted",
            "True",
            Duration::from_secs(60),
        );
    }
    let cm = get_json(c, &["configmap", "bulky-us-east", "-n", ns]).expect("configmap");
    assert!(cm["data"].get("gateway.json").is_none(), "{}", cm["data"]);
    let gz = cm["binaryData"]["gateway.json.gz"]
        .as_str()
        .expect("compressed config");
    eprintln!("compressed configuration: {} base64 bytes", gz.len());

    let mut gateway = gateway_process(c, ns, "bulky", "us-east", gw_port);
    for model in ["big-0-0", "big-3-59"] {
        let chat =
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        let (status, body) = http("POST", gw_port, "/v1/chat/completions", &chat).expect("answer");
        assert_eq!(status, 200, "{model}: {body}");
        assert!(body.contains("Hello from alpha"), "{body}");
    }
    let _ = gateway.kill();
    let _ = gateway.wait();
    let _ = provider.kill();
    let _ = provider.wait();
}

/// A chat completion for model `m` with `key` as the client key: the status code.
fn chat_as(port: u16, key: &str) -> Option<u16> {
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let auth = format!("Authorization: Bearer {key}\r\n");
    http_with("POST", port, "/v1/chat/completions", &auth, body).map(|(status, _)| status)
}

#[test]
fn a_rotated_client_key_applies_in_a_running_gateway_without_a_restart() {
    let c = cluster();
    let ns = c.namespace("rotate").expect("namespace");
    let ns = ns.name();
    let (mut provider, fake_port) = fake_provider(c, ns, "alpha");
    let gw_port = free_port();
    let manifest = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: clients}}\nstringData: {{app: key-one}}\n---\n\
apiVersion: switchyard.dev/v1alpha1\nkind: ProviderPool\nmetadata: {{name: rot}}\nspec:\n  regions: [{{name: us-east, replicas: 1}}]\n  providers:\n  - {{name: alpha, type: openaiCompatible, endpoint: 'http://127.0.0.1:{fake_port}', region: us-east, models: [{{name: m}}]}}\n---\n\
apiVersion: switchyard.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {{name: rot}}\nspec:\n  poolRef: {{name: rot}}\n  clientAuth: {{secretRef: {{name: clients}}}}\n  routes: [{{model: m, targets: [{{provider: alpha}}]}}]\n"
    );
    let (ok, _, err) = c
        .kubectl_input(&["apply", "-n", ns, "-f", "-"], &manifest)
        .expect("kubectl");
    assert!(ok, "{err}");
    wait_condition(
        c,
        ns,
        "routingpolicy/rot",
        "Accepted",
        "True",
        Duration::from_secs(60),
    );
    let mut gateway = gateway_process(c, ns, "rot", "us-east", gw_port);
    assert_eq!(chat_as(gw_port, "key-one"), Some(200));
    assert_eq!(chat_as(gw_port, "key-two"), Some(401));

    let rotated = Instant::now();
    let (ok, _, err) = c
        .kubectl_input(
            &["apply", "-n", ns, "-f", "-"],
            "apiVersion: v1\nkind: Secret\nmetadata: {name: clients}\nstringData: {app: key-two}\n",
        )
        .expect("kubectl");
    assert!(ok, "{err}");
    wait_for("the rotated key accepted", Duration::from_secs(10), || {
        (chat_as(gw_port, "key-two") == Some(200)).then_some(())
    });
    eprintln!("a rotated client key applied after {:?}", rotated.elapsed());
    assert_eq!(
        chat_as(gw_port, "key-one"),
        Some(401),
        "the old key is refused"
    );

    let _ = gateway.kill();
    let _ = gateway.wait();
    let _ = provider.kill();
    let _ = provider.wait();
}

#[test]
fn gateways_serve_from_the_operators_configmap_and_report_provider_health_in_status() {
    let c = cluster();
    let ns = c.namespace("health").expect("namespace");
    let (alpha, alpha_port) = fake_provider(c, ns.name(), "alpha");
    let (beta, beta_port) = fake_provider(c, ns.name(), "beta");
    let (gamma, gamma_port) = fake_provider(c, ns.name(), "gamma");
    let fakes = [alpha, beta, gamma];
    let gw_port = free_port();
    let manifest = [
        "apiVersion: v1".to_owned(),
        "kind: Secret".to_owned(),
        "metadata: {name: key}".to_owned(),
        "stringData: {apiKey: sk-health-test}".to_owned(),
        "---".to_owned(),
        "apiVersion: switchyard.dev/v1alpha1".to_owned(),
        "kind: ProviderPool".to_owned(),
        "metadata: {name: health}".to_owned(),
        "spec:".to_owned(),
        "  regions: [{name: us-east, replicas: 1}]".to_owned(),
        "  providers:".to_owned(),
        format!("  - {{name: alpha, type: openaiCompatible, endpoint: 'http://127.0.0.1:{alpha_port}', region: us-east, credentials: {{secretRef: {{name: key}}}}, models: [{{name: m}}]}}"),
        format!("  - {{name: beta, type: openaiCompatible, endpoint: 'http://127.0.0.1:{beta_port}', region: eu-west, credentials: {{secretRef: {{name: key}}}}, models: [{{name: m}}]}}"),
        // No route sends it traffic: only its active probes speak for it.
        format!("  - {{name: gamma, type: openaiCompatible, endpoint: 'http://127.0.0.1:{gamma_port}', region: us-east, models: [{{name: g}}], health: {{active: {{interval: 300ms, timeout: 200ms, healthyThreshold: 1, unhealthyThreshold: 2}}}}}}"),
        "---".to_owned(),
        "apiVersion: switchyard.dev/v1alpha1".to_owned(),
        "kind: RoutingPolicy".to_owned(),
        "metadata: {name: health}".to_owned(),
        "spec:".to_owned(),
        "  poolRef: {name: health}".to_owned(),
        "  routes: [{model: m, targets: [{provider: alpha}, {provider: beta}]}]".to_owned(),
        "  circuitBreaker: {consecutiveFailures: 2, openFor: 8s}".to_owned(),
    ]
    .join("\n");
    let (ok, _, err) = c
        .kubectl_input(&["apply", "-n", ns.name(), "-f", "-"], &manifest)
        .expect("kubectl");
    assert!(ok, "{err}");
    wait_for("the gateway ConfigMap", Duration::from_secs(60), || {
        c.kubectl_ok(&["get", "configmap", "health-us-east", "-n", ns.name()])
            .ok()
    });

    let mut gateway = gateway_process(c, ns.name(), "health", "us-east", gw_port);
    let sa = format!("system:serviceaccount:{}:health-gateway", ns.name());
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let (status, body) = http("POST", gw_port, "/v1/chat/completions", chat).expect("answer");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("Hello from alpha"),
        "the local provider serves: {body}"
    );
    wait_for(
        "alpha Healthy in the pool status",
        Duration::from_secs(15),
        || (provider_state(c, ns.name(), "us-east", "alpha")?.0 == "Healthy").then_some(()),
    );

    // A provider only probed shows the probes' verdict, not "no traffic yet".
    let provider = |name: &str| provider_state(c, ns.name(), "us-east", name);
    wait_for(
        "gamma Healthy by its probes",
        Duration::from_secs(15),
        || (provider("gamma")? == ("Healthy".into(), "ProbeSucceeded".into())).then_some(()),
    );
    http(
        "POST",
        gamma_port,
        "/admin/faults",
        r#"{"fault":"status:503"}"#,
    )
    .expect("fault set");
    wait_for(
        "gamma Ejected by its probes",
        Duration::from_secs(15),
        || (provider("gamma")? == ("Ejected".into(), "ProbeFailed".into())).then_some(()),
    );
    http("DELETE", gamma_port, "/admin/faults", "").expect("fault cleared");

    http(
        "POST",
        alpha_port,
        "/admin/faults",
        r#"{"fault":"status:503"}"#,
    )
    .expect("fault set");
    for _ in 0..3 {
        let (status, body) = http("POST", gw_port, "/v1/chat/completions", chat).expect("answer");
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("Hello from beta"),
            "failover to the remote provider: {body}"
        );
    }
    let started = Instant::now();
    wait_for(
        "alpha Ejected in the pool status",
        Duration::from_secs(15),
        || (provider_state(c, ns.name(), "us-east", "alpha")?.0 == "Ejected").then_some(()),
    );
    eprintln!(
        "provider failure visible in status after {:?}",
        started.elapsed()
    );
    wait_condition(
        c,
        ns.name(),
        "providerpool/health",
        "Degraded",
        "True",
        Duration::from_secs(15),
    );

    http("DELETE", alpha_port, "/admin/faults", "").expect("fault cleared");
    std::thread::sleep(Duration::from_millis(8200));
    let (_, body) = http("POST", gw_port, "/v1/chat/completions", chat).expect("answer");
    assert!(
        body.contains("Hello from alpha"),
        "the breaker closes after a good probe: {body}"
    );
    wait_for("alpha Healthy again", Duration::from_secs(15), || {
        (provider_state(c, ns.name(), "us-east", "alpha")?.0 == "Healthy").then_some(())
    });
    wait_condition(
        c,
        ns.name(),
        "providerpool/health",
        "Degraded",
        "False",
        Duration::from_secs(15),
    );

    // The gateway identity can do its job and nothing more.
    let as_sa = |args: &[&str]| {
        let mut all = vec!["--as", sa.as_str(), "-n", ns.name()];
        all.extend_from_slice(args);
        c.kubectl_ok(&all)
    };
    assert!(as_sa(&["get", "configmap", "health-us-east"]).is_ok());
    assert!(as_sa(&["get", "secret", "key"]).is_ok());
    let refused =
        as_sa(&["create", "configmap", "intruder"]).expect_err("a write outside the grant");
    assert!(refused.to_string().contains("forbidden"), "{refused}");
    assert!(
        as_sa(&["get", "secrets"]).is_err(),
        "listing every Secret is refused"
    );
    assert!(as_sa(&["delete", "deployment", "health-us-east"]).is_err());

    let _ = gateway.kill();
    let _ = gateway.wait();
    for mut f in fakes {
        let _ = f.kill();
        let _ = f.wait();
    }
}

#[test]
fn the_newer_of_two_policies_claiming_a_model_reports_the_conflict() {
    let c = cluster();
    let ns = c.namespace("conflict").expect("namespace");
    small_pool(c, ns.name(), &["us-east"]);
    std::thread::sleep(Duration::from_millis(1100)); // creation timestamps have one-second resolution
    let newer = "apiVersion: switchyard.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {name: newer}\nspec:\n  poolRef: {name: small}\n  routes: [{model: m, targets: [{provider: p}]}, {model: mini, targets: [{provider: p, model: m}]}]\n";
    let (ok, _, err) = c
        .kubectl_input(&["apply", "-n", ns.name(), "-f", "-"], newer)
        .expect("kubectl");
    assert!(ok, "{err}");
    let (status, _reason, message) = wait_for(
        "the conflict on the newer policy",
        Duration::from_secs(60),
        || {
            let p = get_json(c, &["routingpolicy", "newer", "-n", ns.name()])?;
            condition(&p, "Accepted").filter(|c| c.1 == "RouteConflict")
        },
    );
    assert_eq!(status, "False");
    assert!(
        message.contains("model \"m\" is already served by the older RoutingPolicy \"small\""),
        "{message}"
    );
    // Its other route is served, and both its status and the gateways' config say so.
    let (_, _, message) = wait_for(
        "the newer policy's other route served",
        Duration::from_secs(30),
        || {
            let p = get_json(c, &["routingpolicy", "newer", "-n", ns.name()])?;
            condition(&p, "Accepted").filter(|c| c.2.contains("are served"))
        },
    );
    assert!(
        message.contains("its other routes (mini) are served"),
        "{message}"
    );
    let p = get_json(c, &["routingpolicy", "newer", "-n", ns.name()]).expect("newer");
    assert_eq!(p["status"]["routes"], "mini", "{p}");
    let cm = get_json(c, &["configmap", "small-us-east", "-n", ns.name()]).expect("configmap");
    let config = cm["data"]["gateway.json"].as_str().expect("config text");
    let config: Value = serde_json::from_str(config).expect("config JSON");
    let served: Vec<(String, String)> = config["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .map(|r| {
            (
                r["model"].as_str().unwrap_or_default().to_owned(),
                r["policy"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(
        served.contains(&("mini".into(), "newer".into()))
            && served.contains(&("m".into(), "small".into()))
            && served.len() == 2,
        "{served:?}"
    );
    let older = get_json(c, &["routingpolicy", "small", "-n", ns.name()]).expect("older");
    assert_eq!(
        condition(&older, "Accepted").map(|c| c.0).as_deref(),
        Some("True"),
        "the older policy keeps the model"
    );
}

#[test]
fn transitions_are_recorded_as_events() {
    let c = cluster();
    let ns = c.namespace("events").expect("namespace");
    small_pool(c, ns.name(), &["us-east"]);
    let events = wait_for("a Ready event", Duration::from_secs(60), || {
        let out = c
            .kubectl_ok(&[
                "get",
                "events",
                "-n",
                ns.name(),
                "-o",
                "jsonpath={range .items[*]}{.involvedObject.kind}/{.reason}{\"\\n\"}{end}",
            ])
            .ok()?;
        out.contains("ProviderPool/AllRegionsReady").then_some(out)
    });
    assert!(events.contains("RoutingPolicy/Accepted"), "{events}");
    let count = |reason: &str| events.lines().filter(|l| l.ends_with(reason)).count();
    assert_eq!(
        count("/AllRegionsReady"),
        1,
        "one Event per transition, not per reconcile: {events}"
    );
}

#[test]
fn an_operator_killed_mid_reconcile_converges_after_restart_without_duplicates() {
    let c = cluster();
    let ns = c.namespace("restart").expect("namespace");
    let slot = OPERATOR.get().expect("operator started");
    {
        let mut op = slot.lock().expect("lock");
        let _ = op.kill();
        let _ = op.wait();
    }
    small_pool(c, ns.name(), &["us-east", "us-west", "eu-west"]);
    // Start, let it get part-way through the pool's children, kill it, start again.
    {
        let mut op = slot.lock().expect("lock");
        *op = start_operator(c);
        std::thread::sleep(Duration::from_millis(700));
        let _ = op.kill();
        let _ = op.wait();
        *op = start_operator(c);
    }
    wait_condition(
        c,
        ns.name(),
        "providerpool/small",
        "Ready",
        "True",
        Duration::from_secs(90),
    );
    for (kind, expected) in [
        ("deployments", 3),
        ("configmaps", 3),
        ("services", 4),
        ("roles", 1),
        ("rolebindings", 1),
        ("serviceaccounts", 1),
    ] {
        let names = c
            .kubectl_ok(&[
                "get",
                kind,
                "-n",
                ns.name(),
                "-l",
                "switchyard.dev/pool=small",
                "-o",
                "name",
            ])
            .expect("get");
        assert_eq!(names.lines().count(), expected, "{kind}: {names}");
    }
    let rs = c
        .kubectl_ok(&["get", "replicasets", "-n", ns.name(), "-o", "name"])
        .expect("get");
    assert_eq!(
        rs.lines().count(),
        3,
        "one ReplicaSet per Deployment: no spec churn across the restart: {rs}"
    );
}

#[test]
fn the_operator_says_clearly_when_the_crds_are_missing() {
    // A cluster of its own: the shared one has the CRDs.
    let bare = Cluster::start().expect("a second control plane");
    let out = Command::new(
        workspace_binary("switchyard-operator", "switchyard-operator").expect("built"),
    )
    .args(["--metrics-listen", "127.0.0.1:0", "--no-leader-election"])
    .env("KUBECONFIG", bare.kubeconfig())
    .output()
    .expect("operator runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the CRD providerpools.switchyard.dev is not installed")
            && stderr.contains("charts/switchyard/crds"),
        "{stderr}"
    );
}

#[test]
fn two_replicas_elect_one_leader_and_the_standby_takes_over() {
    let c = cluster();
    let ns = c.namespace("leader").expect("namespace");
    let bin = workspace_binary("switchyard-operator", "switchyard-operator").expect("built");
    let start = |id: &str, port: u16| {
        let mut cmd = Command::new(&bin);
        // Watching only this namespace keeps the pair apart from the shared operator.
        cmd.args([
            "--namespace",
            ns.name(),
            "--leader-election-namespace",
            ns.name(),
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ]);
        cmd.env("POD_NAME", id);
        c.spawn_process(&format!("operator-{id}"), cmd)
            .expect("starts")
    };
    let readyz = |port: u16| {
        http("GET", port, "/readyz", "")
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    let holder = || {
        c.kubectl_ok(&[
            "get",
            "lease",
            "switchyard-operator",
            "-n",
            ns.name(),
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .unwrap_or_default()
    };
    let (pa, pb) = (free_port(), free_port());
    let mut a = start("op-a", pa);
    wait_for("op-a to lead", Duration::from_secs(30), || {
        (readyz(pa) == "leading").then_some(())
    });
    let mut b = start("op-b", pb);
    wait_for("op-b to answer", Duration::from_secs(30), || {
        (!readyz(pb).is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(readyz(pb), "standby");
    assert_eq!(holder(), "op-a");

    let _ = a.kill();
    let _ = a.wait();
    let took_over = Instant::now();
    wait_for("op-b to take over", Duration::from_secs(40), || {
        (readyz(pb) == "leading").then_some(())
    });
    assert_eq!(holder(), "op-b");
    eprintln!("standby took over after {:?}", took_over.elapsed());
    small_pool(c, ns.name(), &["us-east"]);
    wait_condition(
        c,
        ns.name(),
        "providerpool/small",
        "Ready",
        "True",
        Duration::from_secs(60),
    );
    let _ = b.kill();
    let _ = b.wait();
}

#[test]
fn the_operator_stops_cleanly_on_sigterm_and_serves_its_metrics() {
    let c = cluster();
    let ns = c.namespace("sigterm").expect("namespace");
    let port = free_port();
    let mut cmd = Command::new(
        workspace_binary("switchyard-operator", "switchyard-operator").expect("built"),
    );
    cmd.args([
        "--namespace",
        ns.name(),
        "--no-leader-election",
        "--metrics-listen",
        &format!("127.0.0.1:{port}"),
    ]);
    let mut op = c
        .spawn_process(&format!("operator-{}", ns.name()), cmd)
        .expect("starts");
    small_pool(c, ns.name(), &["us-east"]);
    let metrics = wait_for("metrics after a reconcile", Duration::from_secs(60), || {
        let (_, body) = http("GET", port, "/metrics", "")?;
        body.contains("switchyard_operator_pool_ready{")
            .then_some(body)
    });
    for name in [
        "reconcile_duration_seconds",
        "reconciles_in_flight",
        "api_writes_total",
        "pool_ready",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    Command::new("kill")
        .args(["-TERM", &op.id().to_string()])
        .status()
        .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = op.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the operator ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status}");
    let log = std::fs::read_to_string(c.logs_dir().join(format!("operator-{}.log", ns.name())))
        .expect("log");
    assert!(
        log.lines().count() > 0
            && log
                .lines()
                .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "JSON logs:\n{log}"
    );
    assert!(log.contains("signal received"), "{log}");
}

/// A pool named `pool` with one provider and the given regions (YAML flow mappings),
/// and its policy.
fn named_pool(c: &Cluster, ns: &str, pool: &str, regions: &[&str]) {
    let manifest = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: key}}\nstringData: {{apiKey: k}}\n---\n\
apiVersion: switchyard.dev/v1alpha1\nkind: ProviderPool\nmetadata: {{name: {pool}}}\nspec:\n  regions: [{}]\n  providers:\n  - {{name: p, type: openai, endpoint: 'https://api.openai.com', region: us-east, credentials: {{secretRef: {{name: key}}}}, models: [{{name: m}}]}}\n---\n\
apiVersion: switchyard.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {{name: {pool}}}\nspec:\n  poolRef: {{name: {pool}}}\n  routes: [{{model: m, targets: [{{provider: p}}]}}]\n",
        regions.join(", ")
    );
    let (ok, _, err) = c
        .kubectl_input(&["apply", "-n", ns, "-f", "-"], &manifest)
        .expect("kubectl");
    assert!(ok, "{err}");
}

/// Waits for `pool` to say Ready=False with `reason`; returns the message.
fn blocked(c: &Cluster, ns: &str, pool: &str, reason: &str) -> String {
    wait_for(
        &format!("pool {pool} Ready=False {reason}"),
        Duration::from_secs(60),
        || {
            let obj = get_json(c, &["providerpool", pool, "-n", ns])?;
            let (status, why, message) = condition(&obj, "Ready")?;
            (status == "False" && why == reason).then_some(message)
        },
    )
}

fn events(c: &Cluster, ns: &str) -> String {
    c.kubectl_ok(&[
        "get",
        "events",
        "-n",
        ns,
        "-o",
        "jsonpath={range .items[*]}{.involvedObject.kind}/{.involvedObject.name}/{.type}/{.reason}: {.message}{\"\\n\"}{end}",
    ])
    .unwrap_or_default()
}

#[test]
fn a_users_object_with_a_childs_name_is_never_taken_over_nor_deleted_with_the_pool() {
    let c = cluster();
    let ns = c.namespace("owner").expect("namespace");
    let ns = ns.name();
    c.kubectl_ok(&[
        "create",
        "configmap",
        "small-us-east",
        "-n",
        ns,
        "--from-literal=notes=mine",
    ])
    .expect("the user's configmap");
    named_pool(c, ns, "small", &["{name: us-east, replicas: 1}"]);
    let message = blocked(c, ns, "small", "NameConflict");
    assert!(
        message.contains("ConfigMap \"small-us-east\"")
            && message.contains("not created by the operator"),
        "{message}"
    );
    let theirs = get_json(c, &["configmap", "small-us-east", "-n", ns]).expect("configmap");
    assert_eq!(
        theirs["data"],
        serde_json::json!({"notes": "mine"}),
        "nothing merged in"
    );
    assert!(
        theirs["metadata"]["ownerReferences"].is_null(),
        "not adopted: {theirs}"
    );
    let seen = wait_for("a NameConflict event", Duration::from_secs(30), || {
        let all = events(c, ns);
        all.contains("ProviderPool/small/Warning/NameConflict")
            .then_some(all)
    });
    assert!(seen.contains("small-us-east"), "{seen}");
    // Its policy compiles, but no gateway runs it: not Accepted.
    let (status, _, message) = wait_for(
        "the policy Pending while its ConfigMap cannot be written",
        Duration::from_secs(30),
        || {
            let p = get_json(c, &["routingpolicy", "small", "-n", ns])?;
            condition(&p, "Accepted").filter(|c| c.1 == "Pending")
        },
    );
    assert_eq!(status, "False");
    assert!(
        message.contains("does not hold its routes for m yet"),
        "{message}"
    );

    c.kubectl_ok(&["delete", "providerpool", "small", "-n", ns, "--wait=true"])
        .expect("delete pool");
    std::thread::sleep(Duration::from_secs(3));
    let kept = get_json(c, &["configmap", "small-us-east", "-n", ns])
        .expect("the user's configmap outlives the pool");
    assert_eq!(kept["data"], serde_json::json!({"notes": "mine"}));
}

#[test]
fn two_pools_whose_child_names_collide_never_take_each_others_objects() {
    let c = cluster();
    let ns = c.namespace("collide").expect("namespace");
    let ns = ns.name();
    named_pool(c, ns, "col", &["{name: us-east, replicas: 1}"]);
    wait_for("pool col's ConfigMap", Duration::from_secs(60), || {
        get_json(c, &["configmap", "col-us-east", "-n", ns])
    });
    // Pool "col-us" in region "east" would name its children "col-us-east" too.
    named_pool(c, ns, "col-us", &["{name: east, replicas: 1}"]);
    let message = blocked(c, ns, "col-us", "NameConflict");
    assert!(
        message.contains("\"col-us-east\"") && message.contains("ProviderPool \"col\""),
        "{message}"
    );
    let owner = |kind: &str| {
        get_json(c, &[kind, "col-us-east", "-n", ns]).and_then(|o| {
            o["metadata"]["ownerReferences"][0]["name"]
                .as_str()
                .map(str::to_owned)
        })
    };
    assert_eq!(owner("configmap").as_deref(), Some("col"));
    assert_eq!(owner("service").as_deref(), Some("col"));
    assert_eq!(owner("deployment").as_deref(), Some("col"));
    // Once the first pool is gone, the second one takes the names over by itself.
    c.kubectl_ok(&["delete", "providerpool", "col", "-n", ns])
        .expect("delete col");
    wait_for(
        "col-us owning its ConfigMap",
        Duration::from_secs(90),
        || (owner("configmap").as_deref() == Some("col-us")).then_some(()),
    );
}

#[test]
fn a_child_the_api_server_refuses_shows_in_the_pools_status_and_events() {
    let c = cluster();
    let ns = c.namespace("refused").expect("namespace");
    let ns = ns.name();
    // Valid for the CRD; the API server refuses a Deployment asking more than its limit.
    named_pool(
        c,
        ns,
        "greedy",
        &["{name: us-east, replicas: 1, resources: {requests: {cpu: '2'}, limits: {cpu: '1'}}}"],
    );
    let message = blocked(c, ns, "greedy", "ChildRejected");
    assert!(
        message.contains("Deployment \"greedy-us-east\"")
            && message.contains("must be less than or equal to cpu limit"),
        "{message}"
    );
    wait_for("a ChildRejected event", Duration::from_secs(30), || {
        events(c, ns)
            .contains("ProviderPool/greedy/Warning/ChildRejected")
            .then_some(())
    });
    // Fixing the spec clears it.
    c.kubectl_ok(&[
        "patch",
        "providerpool",
        "greedy",
        "-n",
        ns,
        "--type=json",
        "-p",
        "[{\"op\":\"remove\",\"path\":\"/spec/regions/0/resources\"}]",
    ])
    .expect("patch");
    wait_condition(
        c,
        ns,
        "providerpool/greedy",
        "Ready",
        "True",
        Duration::from_secs(60),
    );
}

#[test]
fn a_region_whose_pods_cannot_be_scheduled_says_why() {
    let c = cluster();
    let ns = c.namespace("nowhere").expect("namespace");
    let ns = ns.name();
    // No node is labelled with this region.
    named_pool(c, ns, "lost", &["{name: sa-east, replicas: 1}"]);
    let message = blocked(c, ns, "lost", "PodsUnschedulable");
    assert!(
        message.starts_with(
            "region sa-east has 0/1 gateway replicas ready: pods cannot be scheduled: "
        ) && message.contains("node affinity/selector"),
        "{message}"
    );
    wait_for("a PodsUnschedulable event", Duration::from_secs(30), || {
        events(c, ns)
            .contains("ProviderPool/lost/Warning/PodsUnschedulable")
            .then_some(())
    });
    // Labelling a node is not ours to do; moving the region to where nodes are fixes it.
    c.kubectl_ok(&[
        "patch",
        "providerpool",
        "lost",
        "-n",
        ns,
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/regions/0/nodeSelector","value":{"topology.kubernetes.io/region":"us-east"}}]"#,
    ])
    .expect("patch the region's node selector");
    wait_condition(
        c,
        ns,
        "providerpool/lost",
        "Ready",
        "True",
        Duration::from_secs(90),
    );
}

#[test]
fn a_pool_name_that_cannot_name_a_service_is_refused_at_admission() {
    let c = cluster();
    let ns = c.namespace("dotted").expect("namespace");
    let manifest = "apiVersion: switchyard.dev/v1alpha1\nkind: ProviderPool\nmetadata: {name: chat.v2}\nspec:\n  regions: [{name: us-east}]\n  providers:\n  - {name: vllm, type: openaiCompatible, endpoint: 'http://vllm:8000', region: us-east, models: [{name: m}]}\n";
    let (ok, _, err) = c
        .kubectl_input(&["apply", "-n", ns.name(), "-f", "-"], manifest)
        .expect("kubectl");
    assert!(!ok, "a dotted pool name was accepted");
    assert!(
        err.contains("metadata.name") && err.contains("DNS-1035"),
        "{err}"
    );
}

#[test]
fn a_gateway_scaled_or_its_config_edited_by_hand_is_set_back_within_seconds() {
    let c = cluster();
    let ns = c.namespace("drift").expect("namespace");
    let ns = ns.name();
    named_pool(c, ns, "drift", &["{name: us-east, replicas: 1}"]);
    wait_condition(
        c,
        ns,
        "providerpool/drift",
        "Ready",
        "True",
        Duration::from_secs(60),
    );
    let config = |c: &Cluster| {
        get_json(c, &["configmap", "drift-us-east", "-n", ns]).map(|cm| cm["data"].clone())
    };
    let good = config(c).expect("the region's config");
    c.kubectl_ok(&[
        "scale",
        "deployment",
        "drift-us-east",
        "-n",
        ns,
        "--replicas=7",
    ])
    .expect("scale");
    c.kubectl_ok(&[
        "patch",
        "configmap",
        "drift-us-east",
        "-n",
        ns,
        "--type=merge",
        "-p",
        "{\"data\":{\"gateway.json\":\"{}\"}}",
    ])
    .expect("edit the config");
    wait_for(
        "replicas and config restored",
        Duration::from_secs(20),
        || {
            let replicas =
                get_json(c, &["deployment", "drift-us-east", "-n", ns])?["spec"]["replicas"]
                    .as_i64()?;
            (replicas == 1 && config(c)? == good).then_some(())
        },
    );
}

#[test]
fn a_policy_edit_that_does_not_compile_keeps_the_routes_it_served_and_deleting_it_shows() {
    let c = cluster();
    let ns = c.namespace("lastgood").expect("namespace");
    let ns = ns.name();
    named_pool(c, ns, "keep", &["{name: us-east, replicas: 1}"]);
    wait_condition(
        c,
        ns,
        "routingpolicy/keep",
        "Accepted",
        "True",
        Duration::from_secs(60),
    );
    let served = || -> Option<Vec<(String, String)>> {
        let cm = get_json(c, &["configmap", "keep-us-east", "-n", ns])?;
        let config: Value = serde_json::from_str(cm["data"]["gateway.json"].as_str()?).ok()?;
        Some(
            config["routes"]
                .as_array()?
                .iter()
                .map(|r| {
                    (
                        r["model"].as_str().unwrap_or_default().to_owned(),
                        r["targets"][0]["provider"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    )
                })
                .collect(),
        )
    };
    let before = wait_for(
        "the route in the ConfigMap",
        Duration::from_secs(30),
        || served().filter(|r| !r.is_empty()),
    );
    assert_eq!(before, [("m".to_owned(), "p".to_owned())]);

    // A typo in the provider's name: the edit is refused, the route keeps serving.
    c.kubectl_ok(&[
        "patch",
        "routingpolicy",
        "keep",
        "-n",
        ns,
        "--type=json",
        "-p",
        "[{\"op\":\"replace\",\"path\":\"/spec/routes/0/targets/0/provider\",\"value\":\"typo\"}]",
    ])
    .expect("patch");
    let policy = wait_condition(
        c,
        ns,
        "routingpolicy/keep",
        "Accepted",
        "False",
        Duration::from_secs(60),
    );
    let (_, _, message) = condition(&policy, "Accepted").expect("condition");
    assert!(
        message.contains("\"typo\"")
            && message.contains("generation 2 was refused")
            && message.contains("(m)"),
        "{message}"
    );
    assert_eq!(
        policy["status"]["routes"], "m",
        "the status lists what is served"
    );
    let (refs, reason, refs_message) = condition(&policy, "ResolvedRefs").expect("condition");
    assert_eq!(
        (refs.as_str(), reason.as_str()),
        ("False", "ProviderNotFound")
    );
    assert!(
        refs_message.starts_with("spec.routes[0].targets[0].provider: provider \"typo\""),
        "only the unresolved reference: {refs_message}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        served().expect("config"),
        before,
        "the last good route stays in the config"
    );
    let pool = get_json(c, &["providerpool", "keep", "-n", ns]).expect("pool");
    assert_eq!(
        condition(&pool, "Ready").map(|c| c.0).as_deref(),
        Some("True")
    );

    // Deleting the policy does take its routes away, and the pool says so.
    c.kubectl_ok(&["delete", "routingpolicy", "keep", "-n", ns])
        .expect("delete policy");
    wait_for("no routes", Duration::from_secs(60), || {
        served().filter(|r| r.is_empty())
    });
    wait_for(
        "the pool saying no policy routes to it",
        Duration::from_secs(60),
        || {
            let pool = get_json(c, &["providerpool", "keep", "-n", ns])?;
            condition(&pool, "Ready")?
                .2
                .contains("no RoutingPolicy routes a model")
                .then_some(())
        },
    );
}

#[test]
fn a_fallback_cycle_is_accepted_and_the_status_says_how_it_is_resolved() {
    let c = cluster();
    let ns = c.namespace("cycle").expect("namespace");
    let manifest = "apiVersion: v1\nkind: Secret\nmetadata: {name: key}\nstringData: {apiKey: k}\n---\n\
apiVersion: switchyard.dev/v1alpha1\nkind: ProviderPool\nmetadata: {name: cyc}\nspec:\n  regions: [{name: us-east, replicas: 1}]\n  providers:\n  - {name: p, type: openai, endpoint: 'https://api.openai.com', region: us-east, credentials: {secretRef: {name: key}}, models: [{name: big}, {name: small}]}\n---\n\
apiVersion: switchyard.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {name: cyc}\nspec:\n  poolRef: {name: cyc}\n  routes:\n  - {model: big, targets: [{provider: p}], fallbacks: [small]}\n  - {model: small, targets: [{provider: p}], fallbacks: [big]}\n";
    let (ok, _, err) = c
        .kubectl_input(&["apply", "-n", ns.name(), "-f", "-"], manifest)
        .expect("kubectl");
    assert!(ok, "{err}");
    let policy = wait_condition(
        c,
        ns.name(),
        "routingpolicy/cyc",
        "Accepted",
        "True",
        Duration::from_secs(60),
    );
    let (_, _, message) = condition(&policy, "Accepted").expect("condition");
    assert!(
        message.contains("(big, small) lead back to one another")
            && message.contains("at most once"),
        "{message}"
    );
}

#[test]
fn with_external_replicas_an_autoscalers_count_is_kept_and_reported() {
    let c = cluster();
    let ns = c.namespace("hpa").expect("namespace");
    let ns = ns.name();
    named_pool(c, ns, "auto", &["{name: us-east, replicas: 1}"]);
    c.kubectl_ok(&[
        "patch",
        "providerpool",
        "auto",
        "-n",
        ns,
        "--type=merge",
        "-p",
        "{\"spec\":{\"gateway\":{\"externalReplicas\":true}}}",
    ])
    .expect("patch");
    wait_condition(
        c,
        ns,
        "providerpool/auto",
        "Ready",
        "True",
        Duration::from_secs(60),
    );
    // What a HorizontalPodAutoscaler does.
    c.kubectl_ok(&[
        "scale",
        "deployment",
        "auto-us-east",
        "-n",
        ns,
        "--replicas=3",
    ])
    .expect("scale");
    wait_for(
        "the pool reporting 3 replicas",
        Duration::from_secs(30),
        || {
            let pool = get_json(c, &["providerpool", "auto", "-n", ns])?;
            (pool["status"]["regions"][0]["desiredReplicas"] == 3
                && pool["status"]["regions"][0]["readyReplicas"] == 3)
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let replicas = get_json(c, &["deployment", "auto-us-east", "-n", ns]).expect("deployment")
        ["spec"]["replicas"]
        .clone();
    assert_eq!(
        replicas, 3,
        "the operator left the autoscaler's count alone"
    );
}
