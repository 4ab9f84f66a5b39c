//! The generated CRDs: shape, documentation, bounds, CEL rules, defaults, and the
//! invalid-manifest corpus in `examples/invalid/` (CEL rules evaluated locally with
//! kube-cel; the same corpus runs against a real API server in the end-to-end tier).

use std::path::{Path, PathBuf};

use crds::k8s::CustomResourceDefinition;
use crds::{ProviderPool, RoutingPolicy};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn crd(kind: &str) -> CustomResourceDefinition {
    crds::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("kind is generated")
}

fn schema(kind: &str) -> Value {
    let crd = crd(kind);
    let version = crd.spec.versions.first().expect("one version");
    serde_json::to_value(
        version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema"),
    )
    .expect("schema serializes")
}

/// A corpus case: the file's expectations and its document.
struct Case {
    name: String,
    layer: String,
    expect: String,
    doc: Value,
}

fn corpus() -> Vec<Case> {
    let files = crds::manifests::files(&repo().join("examples/invalid")).expect("corpus dir");
    assert!(
        files.len() >= 30,
        "the invalid corpus is expected to be broad, found {}",
        files.len()
    );
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("readable");
            let header = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                    .unwrap_or_else(|| panic!("{} lacks a '# {key}:' line", path.display()))
                    .to_owned()
            };
            let mut docs = crds::manifests::documents(&text).expect("corpus files are valid YAML");
            assert_eq!(docs.len(), 1, "{}: one document per case", path.display());
            Case {
                name: path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_owned(),
                layer: header("layer"),
                expect: header("expect"),
                doc: docs.remove(0),
            }
        })
        .collect()
}

fn cel_errors(doc: &Value) -> Vec<String> {
    let kind = doc["kind"].as_str().expect("kind");
    match kube_cel::validate(&schema(kind), doc, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .iter()
            .map(|e| format!("{}: {}", e.field_path, e.message))
            .collect(),
    }
}

// === shape ===

#[test]
fn crds_are_namespaced_v1alpha1_in_the_switchyard_group_and_category() {
    for (kind, plural, short) in [
        ("ProviderPool", "providerpools", "pp"),
        ("RoutingPolicy", "routingpolicies", "rp"),
    ] {
        let crd = crd(kind);
        assert_eq!(crd.spec.group, "switchyard.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.plural, plural);
        assert!(
            crd.spec
                .names
                .short_names
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|s| s == short)
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["switchyard".to_owned()][..])
        );
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{kind} has a status subresource"
        );
    }
}

#[test]
fn printer_columns_show_the_essentials() {
    let columns = |kind: &str| -> Vec<(String, String)> {
        crd(kind).spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.priority.unwrap_or(0) == 0)
            .map(|c| (c.name, c.json_path))
            .collect()
    };
    let pool = columns("ProviderPool");
    let names: Vec<&str> = pool.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["Regions", "Providers", "Ready", "Age"]);
    assert!(pool[2].1.contains("@.type==\"Ready\""));
    let policy = columns("RoutingPolicy");
    let names: Vec<&str> = policy.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["Pool", "Routes", "Accepted", "Age"]);
    assert!(policy[2].1.contains("@.type==\"Accepted\""));
}

#[test]
fn committed_crds_match_the_types() {
    for crd in crds::crds() {
        let path = repo()
            .join("charts/switchyard/crds")
            .join(crds::crd_file_name(&crd));
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = crds::crd_yaml(&crd).expect("renders");
        assert!(
            committed == generated,
            "{} is stale; run `cargo run -p crds --bin crdgen`",
            path.display()
        );
    }
}

/// Walks a schema, calling `visit(path, node)` for every node under `properties`/`items`.
fn walk<'a>(path: &str, node: &'a Value, visit: &mut dyn FnMut(&str, &'a Value)) {
    visit(path, node);
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            walk(&format!("{path}.{name}"), child, visit);
        }
    }
    if let Some(items) = node.get("items") {
        walk(&format!("{path}[]"), items, visit);
    }
    if let Some(values) = node.get("additionalProperties").filter(|v| v.is_object()) {
        walk(&format!("{path}{{}}"), values, visit);
    }
}

/// Fields whose schema comes from Kubernetes' own types or is written only by controllers.
fn embedded(path: &str) -> bool {
    path.starts_with(".status") || path.contains(".resources") || path.contains(".tolerations")
}

#[test]
fn every_user_field_is_documented_for_kubectl_explain() {
    for kind in ["ProviderPool", "RoutingPolicy"] {
        let mut missing = Vec::new();
        walk("", &schema(kind), &mut |path, node| {
            let top = matches!(path, "" | ".apiVersion" | ".kind" | ".metadata");
            if !top
                && !path.ends_with("[]")
                && !path.ends_with("{}")
                && node.get("description").is_none()
            {
                missing.push(path.to_owned());
            }
        });
        assert!(
            missing.is_empty(),
            "{kind} fields without a description: {missing:?}"
        );
    }
}

#[test]
fn every_user_string_and_list_is_bounded() {
    for kind in ["ProviderPool", "RoutingPolicy"] {
        let mut unbounded = Vec::new();
        walk("", &schema(kind), &mut |path, node| {
            if embedded(path) || matches!(path, ".apiVersion" | ".kind") {
                return;
            }
            match node.get("type").and_then(Value::as_str) {
                Some("string") if node.get("maxLength").is_none() && node.get("enum").is_none() => {
                    unbounded.push(path.to_owned())
                }
                Some("array") if node.get("maxItems").is_none() => unbounded.push(path.to_owned()),
                _ => {}
            }
        });
        assert!(
            unbounded.is_empty(),
            "{kind} has unbounded fields: {unbounded:?}"
        );
    }
}

#[test]
fn every_cel_rule_compiles_and_has_a_message() {
    let mut rules = 0;
    for kind in ["ProviderPool", "RoutingPolicy"] {
        let schema = schema(kind);
        let compiled = kube_cel::compile_schema(&schema);
        let errors: Vec<String> = compiled
            .compilation_errors()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{kind}: {errors:?}");
        walk("", &schema, &mut |path, node| {
            for rule in node
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                rules += 1;
                let message = rule
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                assert!(
                    message.len() > 20,
                    "{kind}{path}: rule {} needs a message a user understands",
                    rule["rule"]
                );
            }
        });
    }
    assert!(
        rules >= 20,
        "expected the CEL rules of both kinds, found {rules}"
    );
}

/// Each CEL rule message must be pinned by at least one corpus case, so no rule goes
/// untested.
#[test]
fn every_cel_rule_is_exercised_by_the_corpus() {
    let corpus = corpus();
    for kind in ["ProviderPool", "RoutingPolicy"] {
        walk("", &schema(kind), &mut |path, node| {
            for rule in node
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let message = rule["message"].as_str().unwrap_or_default();
                assert!(
                    corpus
                        .iter()
                        .any(|c| message.contains(&c.expect) || c.expect.contains(message)),
                    "{kind}{path}: no invalid example expects {message:?}"
                );
            }
        });
    }
}

// === the corpus ===

#[test]
fn cel_corpus_cases_fail_with_their_message() {
    for case in corpus().iter().filter(|c| c.layer == "cel") {
        let errors = cel_errors(&case.doc);
        assert!(
            errors.iter().any(|e| e.contains(&case.expect)),
            "{}: expected {:?}, got {errors:?}",
            case.name,
            case.expect
        );
    }
}

#[test]
fn schema_corpus_cases_pass_cel_so_only_the_schema_rejects_them() {
    // Their rejection message comes from the API server's OpenAPI validation, checked in
    // the end-to-end tier; here we pin that CEL is not what catches them.
    for case in corpus().iter().filter(|c| c.layer == "schema") {
        let errors: Vec<String> = cel_errors(&case.doc)
            .into_iter()
            .filter(|e| !e.contains("evaluat"))
            .collect();
        assert!(
            errors.is_empty(),
            "{}: CEL unexpectedly rejects it: {errors:?}",
            case.name
        );
    }
}

#[test]
fn valid_examples_pass_every_cel_rule_and_parse() {
    let manifests =
        crds::manifests::load(&repo().join("examples"), "default").expect("examples load");
    assert_eq!(manifests.pools.len(), 1);
    assert_eq!(manifests.policies.len(), 1);
    for pool in &manifests.pools {
        let doc = serde_json::to_value(pool).expect("serializes");
        assert_eq!(cel_errors(&doc), Vec::<String>::new());
    }
    for policy in &manifests.policies {
        let doc = serde_json::to_value(policy).expect("serializes");
        assert_eq!(cel_errors(&doc), Vec::<String>::new());
    }
}

// === defaults ===

fn minimal_policy() -> Value {
    json!({
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "p"},
        "spec": {"poolRef": {"name": "chat"}, "routes": [{"model": "gpt-4o", "targets": [{"provider": "openai"}]}]}
    })
}

#[test]
fn policy_defaults_follow_the_field() {
    let policy: RoutingPolicy = serde_json::from_value(minimal_policy()).expect("valid");
    let spec = serde_json::to_value(&policy.spec).expect("serializes");
    assert_eq!(
        spec["retry"],
        json!({
            "attempts": 3,
            "maxRetryAfter": "5s",
            "backoff": {"initial": "100ms", "max": "30s", "multiplier": 2.0, "jitter": 0.1},
            "retryOn": {"connectError": true, "firstByteTimeout": true, "statusCodes": [429, 500, 502, 503, 504]},
            "budget": 0.2
        })
    );
    assert_eq!(
        spec["timeouts"],
        json!({"connect": "2s", "firstByte": "30s", "streamIdle": "15s", "total": "5m"})
    );
    assert_eq!(
        spec["circuitBreaker"],
        json!({"consecutiveFailures": 5, "failureRate": 0.5, "window": "1m", "minRequests": 20, "openFor": "30s", "halfOpenProbes": 1})
    );
    assert_eq!(spec["regional"], "preferLocal");
    assert_eq!(spec["routes"][0]["strategy"], "weighted");
}

/// What the API server stores (schema defaults) equals what the Rust types assume (serde
/// defaults), so the operator and a `kubectl get -o yaml` never disagree.
#[test]
fn schema_defaults_match_serde_defaults() {
    for (kind, raw) in [
        ("RoutingPolicy", minimal_policy()),
        (
            "ProviderPool",
            json!({
                "apiVersion": "switchyard.dev/v1alpha1",
                "kind": "ProviderPool",
                "metadata": {"name": "p"},
                "spec": {
                    "regions": [{"name": "us-east"}],
                    "providers": [{"name": "vllm", "type": "openaiCompatible", "endpoint": "http://vllm:8000", "region": "us-east",
                                   "models": [{"name": "llama"}], "health": {"active": {}}}]
                }
            }),
        ),
    ] {
        let by_schema = kube_cel::apply_defaults(&schema(kind), &raw);
        let by_serde = match kind {
            "ProviderPool" => serde_json::to_value(
                serde_json::from_value::<ProviderPool>(raw.clone()).expect("valid"),
            ),
            _ => serde_json::to_value(
                serde_json::from_value::<RoutingPolicy>(raw.clone()).expect("valid"),
            ),
        }
        .expect("serializes");
        // Durations are normalised on output ("300s" -> "5m"); compare parsed values.
        let by_schema: Value = match kind {
            "ProviderPool" => serde_json::to_value(
                serde_json::from_value::<ProviderPool>(by_schema).expect("valid"),
            ),
            _ => serde_json::to_value(
                serde_json::from_value::<RoutingPolicy>(by_schema).expect("valid"),
            ),
        }
        .expect("serializes");
        assert_eq!(by_schema["spec"], by_serde["spec"], "{kind}");
    }
}

#[test]
fn pool_defaults_pin_gateways_to_the_region_label() {
    let pool: ProviderPool = serde_json::from_value(json!({
        "apiVersion": "switchyard.dev/v1alpha1", "kind": "ProviderPool", "metadata": {"name": "p"},
        "spec": {"regions": [{"name": "eu-west"}], "providers": [{"name": "vllm", "type": "openaiCompatible",
                 "endpoint": "http://vllm:8000", "region": "eu-west", "models": [{"name": "llama"}]}]}
    }))
    .expect("valid");
    let region = &pool.spec.regions[0];
    assert_eq!(region.replicas, 2);
    assert_eq!(
        region
            .effective_node_selector()
            .get("topology.kubernetes.io/region")
            .map(String::as_str),
        Some("eu-west")
    );
    assert_eq!(pool.spec.gateway.port, 8080);
    let provider = &pool.spec.providers[0];
    assert!(provider.enabled);
    assert_eq!((provider.weight, provider.priority), (100, 0));
    assert_eq!(provider.health.passive.consecutive_failures, 5);
    assert_eq!(
        provider.health.passive.base_ejection_time.to_string(),
        "30s"
    );
}
