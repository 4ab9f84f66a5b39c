//! The Helm chart: lint, render with every documented option, validate against the real
//! API server, install, run the operator under the chart's identity, uninstall.

use std::process::{Child, Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use harness::{Cluster, repo_root, workspace_binary};

const NS: &str = "switchyard-system";
const RELEASE: &str = "sy";

fn chart() -> String {
    repo_root().join("charts/switchyard").display().to_string()
}

fn helm(c: &Cluster, args: &[&str]) -> Output {
    c.helm().args(args).output().expect("helm runs")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

fn cluster() -> &'static Cluster {
    static NS_READY: OnceLock<()> = OnceLock::new();
    let c = Cluster::shared();
    NS_READY.get_or_init(|| {
        c.kubectl_ok(&["create", "namespace", NS])
            .expect("namespace");
        // The Prometheus Operator's own CRDs, so the monitoring objects are validated
        // against the schemas a real install has (server-side: they are too large for
        // the last-applied annotation).
        let crds = harness::monitoring_crds().expect("the Prometheus Operator CRDs");
        for plural in ["servicemonitors", "podmonitors", "prometheusrules"] {
            let file = crds.join(format!("monitoring.coreos.com_{plural}.yaml"));
            c.kubectl_ok(&["apply", "--server-side", "-f", &file.display().to_string()])
                .expect("CRD applies");
        }
        c.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/podmonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
        ])
        .expect("established");
    });
    c
}

#[test]
fn chart_version_follows_the_workspace_version() {
    let cargo = std::fs::read_to_string(repo_root().join("Cargo.toml")).expect("Cargo.toml");
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .expect("workspace version")
        .trim_matches('"');
    let chart = std::fs::read_to_string(repo_root().join("charts/switchyard/Chart.yaml"))
        .expect("Chart.yaml");
    assert!(
        chart.contains(&format!("\nversion: {version}\n")),
        "chart version"
    );
    assert!(
        chart.contains(&format!("\nappVersion: \"{version}\"\n")),
        "appVersion"
    );
}

#[test]
fn lint_is_clean_in_strict_mode() {
    let c = Cluster::shared();
    let out = helm(c, &["lint", "--strict", &chart()]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn every_documented_option_renders_objects_the_api_server_accepts() {
    let c = cluster();
    let sets: &[&[&str]] = &[
        &[],
        &["--set", "watchNamespaces={team-a,team-b}"],
        &["--set", "clusterWide=true"],
        &[
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "dashboard.enabled=true",
        ],
        &[
            "--set",
            "leaderElection.enabled=false",
            "--set",
            "replicaCount=1",
        ],
        &[
            "--set",
            "serviceAccount.create=false",
            "--set",
            "serviceAccount.name=existing",
        ],
        &[
            "--set",
            "metrics.service.enabled=false",
            "--set",
            "podDisruptionBudget.enabled=false",
            "--set",
            "logFormat=text",
        ],
    ];
    for ns in ["team-a", "team-b"] {
        let _ = c.kubectl_ok(&["create", "namespace", ns]);
    }
    let path = chart();
    for set in sets {
        let mut args = vec!["template", RELEASE, &path, "-n", NS];
        args.extend_from_slice(set);
        let out = helm(c, &args);
        assert!(out.status.success(), "{set:?}: {}", text(&out));
        let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
        let (ok, _, err) = c
            .kubectl_input(
                &[
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "--dry-run=server",
                    "-f",
                    "-",
                ],
                &rendered,
            )
            .expect("kubectl");
        assert!(
            ok,
            "{set:?}: the API server refused the rendered chart: {err}"
        );
        let broad = rendered.contains("kind: ClusterRole\nmetadata:\n  name: sy-switchyard\n");
        if set.iter().any(|s| s.contains("clusterWide")) {
            assert!(broad, "cluster-wide mode has its ClusterRole");
        } else {
            assert!(
                !broad,
                "{set:?}: only cluster-wide mode has a broad ClusterRole"
            );
        }
        if set.iter().any(|s| s.contains("watchNamespaces")) {
            assert!(
                rendered.contains("namespace: team-b") && rendered.contains("--namespace=team-a"),
                "{rendered}"
            );
        } else if set.is_empty() {
            assert!(
                rendered.contains(&format!("--namespace={NS}")),
                "by default the release namespace only: {rendered}"
            );
        }
    }
}

#[test]
fn the_values_schema_rejects_typos_and_wrong_types_clearly() {
    let c = Cluster::shared();
    let out = helm(
        c,
        &["template", RELEASE, &chart(), "--set", "replicaCount=two"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("/replicaCount") && text(&out).contains("want integer"),
        "{}",
        text(&out)
    );
    let out = helm(
        c,
        &[
            "template",
            RELEASE,
            &chart(),
            "--set",
            "leaderElection.enabled=false",
        ],
    );
    assert!(
        !out.status.success(),
        "two replicas without leader election were accepted"
    );
    assert!(
        text(&out).contains("/replicaCount") && text(&out).contains("want 1"),
        "{}",
        text(&out)
    );
    let out = helm(c, &["template", RELEASE, &chart(), "--set", "replicas=2"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("additional properties 'replicas' not allowed"),
        "{}",
        text(&out)
    );
}

static OPERATOR: OnceLock<Mutex<Child>> = OnceLock::new();

#[test]
fn install_run_the_operator_as_the_charts_identity_and_uninstall_cleanly() {
    let c = cluster();
    let out = helm(
        c,
        &[
            "install",
            RELEASE,
            &chart(),
            "-n",
            NS,
            "--wait",
            "--timeout",
            "120s",
            "--set",
            "clusterWide=true",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("kubectl get providerpools -A -w"),
        "NOTES tell the user what to watch"
    );
    c.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/providerpools.switchyard.dev",
    ])
    .expect("CRDs from the chart");

    // The operator process runs with exactly the chart's RBAC.
    let sa = format!("system:serviceaccount:{NS}:sy-switchyard");
    let kubeconfig = c
        .kubeconfig_as(
            &sa,
            &[
                "system:serviceaccounts",
                &format!("system:serviceaccounts:{NS}"),
                "system:authenticated",
            ],
        )
        .expect("kubeconfig");
    let mut cmd = Command::new(
        workspace_binary("switchyard-operator", "switchyard-operator").expect("built"),
    );
    cmd.args([
        "--metrics-listen",
        "127.0.0.1:0",
        "--leader-election-namespace",
        NS,
        "--log-format",
        "text",
    ]);
    cmd.env("KUBECONFIG", &kubeconfig);
    let child = c
        .spawn_process("operator-as-chart-sa", cmd)
        .expect("operator starts");
    OPERATOR.get_or_init(|| Mutex::new(child));

    let ns = c.namespace("chart").expect("namespace");
    let manifest = "apiVersion: v1\nkind: Secret\nmetadata: {name: key}\nstringData: {apiKey: k}\n---\n\
apiVersion: switchyard.dev/v1alpha1\nkind: ProviderPool\nmetadata: {name: p}\nspec:\n  regions: [{name: us-east}, {name: eu-west, replicas: 1}]\n  providers:\n  - {name: a, type: openai, endpoint: 'https://api.openai.com', region: us-east, credentials: {secretRef: {name: key}}, models: [{name: m}]}\n---\n\
apiVersion: switchyard.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {name: p}\nspec:\n  poolRef: {name: p}\n  routes: [{model: m, targets: [{provider: a}]}]\n";
    let (ok, _, err) = c
        .kubectl_input(&["apply", "-n", ns.name(), "-f", "-"], manifest)
        .expect("kubectl");
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ready = c
            .kubectl_ok(&[
                "get",
                "providerpool",
                "p",
                "-n",
                ns.name(),
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .unwrap_or_default();
        let accepted = c
            .kubectl_ok(&[
                "get",
                "routingpolicy",
                "p",
                "-n",
                ns.name(),
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"ResolvedRefs\")].status}",
            ])
            .unwrap_or_default();
        if ready == "True" && accepted == "True" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the operator under the chart's RBAC did not converge (Ready={ready:?}, ResolvedRefs={accepted:?}); see {}/operator-as-chart-sa.log",
            c.logs_dir().display()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let pdbs = c
        .kubectl_ok(&["get", "pdb", "-n", ns.name(), "-o", "name"])
        .expect("pdbs");
    assert_eq!(
        pdbs.trim(),
        "poddisruptionbudget.policy/p-us-east",
        "a PDB only where replicas > 1"
    );

    // ... and nothing more.
    for (verb, resource) in [
        ("create", "pods"),
        ("delete", "nodes"),
        ("update", "customresourcedefinitions"),
        ("create", "clusterroles"),
        ("delete", "namespaces"),
    ] {
        let answer = c
            .kubectl()
            .args(["auth", "can-i", verb, resource, "--as", &sa, "-A"])
            .output()
            .expect("kubectl");
        assert_eq!(
            String::from_utf8_lossy(&answer.stdout).trim(),
            "no",
            "the operator may {verb} {resource}"
        );
    }
    let refused = c
        .kubectl_ok(&[
            "--as",
            &sa,
            "-n",
            ns.name(),
            "create",
            "secret",
            "generic",
            "x",
        ])
        .expect_err("refused");
    assert!(refused.to_string().contains("forbidden"), "{refused}");

    let out = helm(c, &["uninstall", RELEASE, "-n", NS, "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let left = c
        .kubectl_ok(&["get", "deployments,services,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings,pdb", "-A", "-l", &format!("app.kubernetes.io/instance={RELEASE}"), "-o", "name"])
        .expect("get");
    assert_eq!(left.trim(), "", "helm uninstall left objects behind");
    c.kubectl_ok(&["get", "crd", "providerpools.switchyard.dev"])
        .expect("CRDs stay, as Helm does");
}

/// By default the operator may act only in its own namespace: every permission it needs
/// there, none elsewhere (checked by impersonating its ServiceAccount).
#[test]
fn by_default_the_operator_can_read_secrets_and_grant_roles_only_in_its_namespace() {
    let c = cluster();
    let ns = "sy-default-rbac";
    let release = "syrbac";
    // `can-i` resolves resources through discovery, so the CRDs must exist.
    let crds = repo_root().join("charts/switchyard/crds");
    c.kubectl_ok(&["apply", "--server-side", "-f", &crds.display().to_string()])
        .expect("CRDs install");
    let out = helm(
        c,
        &[
            "install",
            release,
            &chart(),
            "-n",
            ns,
            "--create-namespace",
            "--skip-crds",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let sa = format!("system:serviceaccount:{ns}:{release}-switchyard");
    let can = |verb: &str, resource: &str, scope: &[&str]| {
        let mut args = vec!["auth", "can-i", verb, resource, "--as", sa.as_str()];
        args.extend_from_slice(scope);
        let out = c.kubectl().args(&args).output().expect("kubectl");
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            answer == "yes" || answer == "no",
            "kubectl auth can-i {verb} {resource}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        answer == "yes"
    };
    for (verb, resource) in [
        ("get", "secrets"),
        ("watch", "secrets"),
        ("create", "roles"),
        ("create", "rolebindings"),
        ("patch", "deployments"),
        ("delete", "configmaps"),
        ("list", "routingpolicies.switchyard.dev"),
        ("create", "events.events.k8s.io"),
    ] {
        assert!(
            can(verb, resource, &["-n", ns]),
            "it needs to {verb} {resource} in {ns}"
        );
    }
    assert!(
        can(
            "patch",
            "providerpools.switchyard.dev",
            &["-n", ns, "--subresource=status"]
        ),
        "it needs to write pool status"
    );
    for (verb, resource, scope) in [
        ("get", "secrets", ["-n", "kube-system"]),
        ("get", "secrets", ["-n", "default"]),
        ("create", "roles", ["-n", "kube-system"]),
        ("create", "rolebindings", ["-n", "kube-system"]),
        ("patch", "deployments", ["-n", "default"]),
        ("list", "providerpools.switchyard.dev", ["-n", "default"]),
    ] {
        assert!(
            !can(verb, resource, &scope),
            "it may {verb} {resource} {scope:?}"
        );
    }
    assert!(!can("list", "secrets", &["-A"]), "it may list every Secret");
    let out = helm(c, &["uninstall", release, "-n", ns, "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// The Dockerfiles' default target builds the binary from source the way images/build.sh
/// does on the host (tests/harness/tests/images.rs builds and inspects the images).
#[test]
fn dockerfiles_copy_the_release_binaries_the_workspace_builds() {
    for (file, package) in [
        ("images/operator.Dockerfile", "switchyard-operator"),
        ("images/gateway.Dockerfile", "switchyard-gateway"),
    ] {
        let text = std::fs::read_to_string(repo_root().join(file)).expect("Dockerfile");
        // The default (Docker) target builds from source with the command images/build.sh
        // runs on the host, and copies the same binary to the same place as `prebuilt`.
        assert!(
            text.contains(&format!(
                "cargo build --release --locked -p {package} --target"
            )),
            "{file} builds {package}"
        );
        assert!(
            text.contains(&format!("COPY --from=build /out/{package} /{package}")),
            "{file} copies the {package} binary it built"
        );
        assert!(
            text.contains(&format!("COPY target/image/bin/{package} /{package}")),
            "{file}'s prebuilt target copies the binary images/build.sh built"
        );
        assert!(text.contains("USER 65532:65532"), "{file} runs as non-root");
        let manifest = std::fs::read_to_string(
            repo_root()
                .join(package.trim_start_matches("switchyard-"))
                .join("Cargo.toml"),
        )
        .expect("Cargo.toml");
        assert!(
            manifest.contains(&format!("name = \"{package}\"")),
            "{package} is a binary of the workspace"
        );
    }
}

/// The chart's alerts, rendered with their default thresholds, against
/// `tests/monitoring/alerts.test.yaml`: each fires on the series that should trigger it
/// and stays quiet on healthy ones (`promtool test rules`).
#[test]
fn alert_rules_fire_on_outages_and_stay_quiet_when_healthy() {
    harness::monitoring_crds().expect("promtool installed");
    let c = Cluster::shared();
    let out = helm(
        c,
        &[
            "template",
            RELEASE,
            &chart(),
            "--set",
            "prometheusRule.enabled=true",
            "-s",
            "templates/prometheusrule.yaml",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let rule: serde_json::Value =
        serde_norway::from_slice(&out.stdout).expect("the rendered PrometheusRule");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("rules.yaml"), rule["spec"].to_string()).expect("rules");
    std::fs::copy(
        repo_root().join("tests/monitoring/alerts.test.yaml"),
        dir.path().join("alerts.test.yaml"),
    )
    .expect("tests");
    let out = Command::new("promtool")
        .args(["test", "rules", "alerts.test.yaml"])
        .current_dir(dir.path())
        .output()
        .expect("promtool runs");
    assert!(out.status.success(), "{}", text(&out));
    let rules = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .expect("rules");
    let tests = std::fs::read_to_string(repo_root().join("tests/monitoring/alerts.test.yaml"))
        .expect("tests");
    for r in rules {
        let name = r["alert"].as_str().expect("an alert");
        assert!(
            tests.contains(&format!("alertname: {name},"))
                || tests.contains(&format!("alertname: {name}\n")),
            "alert {name} has no promtool test"
        );
    }
}

/// With monitoring on, every pool's gateway pods are scraped: the PodMonitor selects the
/// labels the operator gives them, in every namespace it manages, on the port it names.
#[test]
fn the_pod_monitor_selects_the_gateway_pods_the_operator_creates() {
    let c = cluster();
    let out = helm(
        c,
        &[
            "template",
            RELEASE,
            &chart(),
            "-n",
            NS,
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "watchNamespaces={team-a,team-b}",
            "-s",
            "templates/podmonitor.yaml",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let monitor: serde_json::Value =
        serde_norway::from_slice(&out.stdout).expect("the rendered PodMonitor");
    let spec = &monitor["spec"];
    let labels = switchyard_operator_labels();
    for (k, v) in spec["selector"]["matchLabels"].as_object().expect("labels") {
        assert_eq!(
            labels.get(k).map(String::as_str),
            v.as_str(),
            "gateway pods carry {k}"
        );
    }
    assert_eq!(
        spec["namespaceSelector"]["matchNames"],
        serde_json::json!(["team-a", "team-b"])
    );
    assert_eq!(spec["podMetricsEndpoints"][0]["port"], "admin");
}

/// The labels the operator puts on a pool's gateway pods.
fn switchyard_operator_labels() -> std::collections::BTreeMap<String, String> {
    switchyard_operator::render::labels("chat", Some("us-east"))
}
