//! `compile`: golden output for the examples, and a precise error for everything that
//! cannot be served.

use std::path::{Path, PathBuf};

use crds::manifests::Manifests;
use crds::{CompileError, ProviderPool, RoutingPolicy, compile};
use serde_json::json;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn examples() -> Manifests {
    crds::manifests::load(&repo().join("examples"), "default").expect("examples load")
}

/// Compares against `tests/golden/<name>`; `UPDATE_GOLDEN=1` rewrites the file instead.
fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("golden written");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} differs from the compiled output; inspect and rerun with UPDATE_GOLDEN=1\n--- actual ---\n{actual}",
        path.display()
    );
}

#[test]
fn examples_compile_to_the_golden_config_of_each_region() {
    let m = examples();
    let pool = &m.pools[0];
    for region in ["us-east", "us-west", "eu-west"] {
        let out = compile(pool, &m.policies, region).expect("compiles");
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        assert!(out.conflicts.is_empty(), "{:?}", out.conflicts);
        let text = serde_json::to_string_pretty(&out.config).expect("serializes") + "\n";
        golden(&format!("chat-{region}.json"), &text);
    }
}

#[test]
fn compiled_config_holds_secret_references_never_values() {
    let m = examples();
    let out = compile(&m.pools[0], &m.policies, "us-east").expect("compiles");
    let text = serde_json::to_string(&out.config).expect("serializes");
    for secret in &m.secrets {
        for value in secret.string_data.iter().flat_map(|d| d.values()) {
            assert!(
                !text.contains(value.as_str()),
                "secret value leaked into the config"
            );
        }
    }
    let refs = out.config.referenced_secrets();
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        [
            "anthropic",
            "azure-eastus",
            "azure-westeurope",
            "chat-client-keys",
            "openai"
        ]
    );
}

#[test]
fn local_providers_come_first_and_remote_targets_spill_a_tier_under_prefer_local() {
    let m = examples();
    let out = compile(&m.pools[0], &m.policies, "eu-west").expect("compiles");
    let config = &out.config;
    let locals: Vec<&str> = config
        .providers
        .iter()
        .take_while(|p| p.local)
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(locals, ["azure-westeurope"]);
    let route = config.route_for("gpt-4o").expect("routed");
    let tiers: Vec<(&str, u32)> = route
        .targets
        .iter()
        .map(|t| (t.provider.as_str(), t.tier))
        .collect();
    // Local Azure first; remote GPT-4o endpoints next; Claude (priority 1) last.
    assert_eq!(
        tiers,
        [
            ("azure-westeurope", 0),
            ("azure-eastus", 1),
            ("openai", 1),
            ("anthropic", 3)
        ]
    );
    assert_eq!(route.targets[0].deployment.as_deref(), Some("gpt4o-eu"));
    assert_eq!(
        route.targets[3].upstream_model.as_deref(),
        Some("claude-sonnet-4-5")
    );
}

#[test]
fn compile_is_deterministic() {
    let m = examples();
    let mut reversed = m.policies.clone();
    reversed.reverse();
    let a = compile(&m.pools[0], &m.policies, "us-east").expect("compiles");
    let b = compile(&m.pools[0], &reversed, "us-east").expect("compiles");
    assert_eq!(
        serde_json::to_string(&a.config).ok(),
        serde_json::to_string(&b.config).ok()
    );
}

// === what cannot be served ===

fn pool() -> ProviderPool {
    serde_json::from_value(json!({
        "apiVersion": "switchyard.dev/v1alpha1", "kind": "ProviderPool",
        "metadata": {"name": "chat", "namespace": "team"},
        "spec": {
            "regions": [{"name": "us-east"}, {"name": "eu-west"}],
            "providers": [
                {"name": "openai", "type": "openai", "endpoint": "https://api.openai.com/", "region": "us-east",
                 "credentials": {"secretRef": {"name": "openai"}}, "models": [{"name": "gpt-4o"}, {"name": "gpt-4o-mini"}]},
                {"name": "azure", "type": "azureOpenAI", "endpoint": "https://x.openai.azure.com", "region": "eu-west",
                 "azure": {"apiVersion": "2024-10-21"}, "credentials": {"secretRef": {"name": "azure"}},
                 "models": [{"name": "gpt-4o", "deployment": "gpt4o"}]},
                {"name": "local", "type": "openaiCompatible", "endpoint": "http://vllm:8000", "region": "us-east",
                 "models": [{"name": "llama"}]}
            ]
        }
    }))
    .expect("valid pool")
}

fn policy(name: &str, created: &str, spec: serde_json::Value) -> RoutingPolicy {
    let mut spec = spec;
    spec["poolRef"] = json!({"name": "chat"});
    serde_json::from_value(json!({
        "apiVersion": "switchyard.dev/v1alpha1", "kind": "RoutingPolicy",
        "metadata": {"name": name, "namespace": "team", "creationTimestamp": created},
        "spec": spec
    }))
    .expect("valid policy")
}

fn only_errors(spec: serde_json::Value, region: &str) -> Vec<String> {
    let out = compile(
        &pool(),
        &[policy("p", "2026-01-01T00:00:00Z", spec)],
        region,
    )
    .expect("pool compiles");
    assert!(
        out.config.routes.is_empty(),
        "a rejected policy contributes no routes"
    );
    assert_eq!(out.rejected.len(), 1);
    out.rejected[0]
        .errors
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// The kinds of the errors `only_errors` reports, in order.
fn error_kinds(spec: serde_json::Value, region: &str) -> Vec<crds::PolicyErrorKind> {
    let out = compile(
        &pool(),
        &[policy("p", "2026-01-01T00:00:00Z", spec)],
        region,
    )
    .expect("pool compiles");
    out.rejected[0].errors.iter().map(|e| e.kind).collect()
}

#[test]
fn error_kinds_tell_unresolved_references_from_unservable_targets() {
    use crds::PolicyErrorKind::{UnknownModel, UnknownProvider, Unservable};
    let kinds = |spec| error_kinds(spec, "us-east");
    assert_eq!(
        kinds(json!({"routes": [{"model": "gpt-4o", "targets": [{"provider": "bedrock"}]}]})),
        [UnknownProvider]
    );
    assert_eq!(
        kinds(json!({"routes": [{"model": "llama", "targets": [{"provider": "openai"}]}]})),
        [Unservable]
    );
    assert_eq!(
        kinds(
            json!({"routes": [{"model": "gpt-4o", "targets": [{"provider": "openai"}], "fallbacks": ["gpt-5"]}]})
        ),
        [UnknownModel]
    );
}

#[test]
fn rejects_a_region_the_pool_does_not_have() {
    let err = compile(&pool(), &[], "ap-south").expect_err("unknown region");
    assert_eq!(
        err,
        CompileError::UnknownRegion {
            pool: "chat".into(),
            region: "ap-south".into(),
            available: "us-east, eu-west".into()
        }
    );
    assert!(
        err.to_string()
            .contains("region \"ap-south\" is not in spec.regions")
    );
}

#[test]
fn rejects_a_target_naming_an_unknown_provider() {
    let errors = only_errors(
        json!({"routes": [{"model": "gpt-4o", "targets": [{"provider": "openai"}, {"provider": "bedrock"}]}]}),
        "us-east",
    );
    assert_eq!(
        errors,
        [
            "spec.routes[0].targets[1].provider: provider \"bedrock\" is not in ProviderPool \"chat\" (providers: openai, azure, local)"
        ]
    );
}

#[test]
fn rejects_a_target_whose_provider_does_not_serve_the_model() {
    let errors = only_errors(
        json!({"routes": [{"model": "llama", "targets": [{"provider": "openai"}]}]}),
        "us-east",
    );
    assert_eq!(
        errors,
        [
            "spec.routes[0].targets[0]: provider \"openai\" does not serve model \"llama\" (it serves: gpt-4o, gpt-4o-mini); set targets[0].model to one of them"
        ]
    );
}

#[test]
fn rejects_fallbacks_and_redirects_to_models_nobody_routes() {
    let errors = only_errors(
        json!({"routes": [{"model": "gpt-4o", "targets": [{"provider": "openai"}], "fallbacks": ["gpt-5"],
                           "onContextLengthExceeded": {"model": "claude"}, "onContentPolicy": {"model": "safe"}}]}),
        "us-east",
    );
    assert_eq!(
        errors,
        [
            "spec.routes[0].fallbacks[0]: model \"gpt-5\" has no route in this pool (routed models: gpt-4o)",
            "spec.routes[0].onContextLengthExceeded.model: model \"claude\" has no route in this pool (routed models: gpt-4o)",
            "spec.routes[0].onContentPolicy.model: model \"safe\" has no route in this pool (routed models: gpt-4o)",
        ]
    );
}

#[test]
fn rejects_local_only_routes_with_no_provider_in_the_region() {
    let spec = json!({"regional": "localOnly", "routes": [{"model": "gpt-4o-mini", "targets": [{"provider": "openai"}]}]});
    let errors = only_errors(spec.clone(), "eu-west");
    assert_eq!(
        errors,
        [
            "spec.routes[0].targets: regional is localOnly but no target of model \"gpt-4o-mini\" lives in region \"eu-west\"; add a local provider or use preferLocal"
        ]
    );
    // The same policy serves where the provider is local.
    let out = compile(
        &pool(),
        &[policy("p", "2026-01-01T00:00:00Z", spec)],
        "us-east",
    )
    .expect("compiles");
    assert!(out.rejected.is_empty());
}

#[test]
fn rejects_a_pattern_route_to_azure_without_a_model() {
    let errors = only_errors(
        json!({"routes": [{"model": "gpt-*", "targets": [{"provider": "azure"}]}]}),
        "us-east",
    );
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with(
            "spec.routes[0].targets[0].model: pattern route \"gpt-*\" must name a model"
        ),
        "{errors:?}"
    );
}

#[test]
fn pattern_routes_pass_the_requested_name_upstream_and_lose_to_exact_routes() {
    let spec = json!({"routes": [
        {"model": "*", "targets": [{"provider": "local"}]},
        {"model": "gpt-4o*", "targets": [{"provider": "openai", "model": "gpt-4o"}]},
        {"model": "gpt-4o-mini", "targets": [{"provider": "openai"}]}
    ]});
    let out = compile(
        &pool(),
        &[policy("p", "2026-01-01T00:00:00Z", spec)],
        "us-east",
    )
    .expect("compiles");
    let config = &out.config;
    let order: Vec<&str> = config.routes.iter().map(|r| r.model.as_str()).collect();
    assert_eq!(order, ["gpt-4o-mini", "gpt-4o*", "*"]);
    assert_eq!(
        config.route_for("gpt-4o-mini").map(|r| r.model.as_str()),
        Some("gpt-4o-mini")
    );
    assert_eq!(
        config
            .route_for("gpt-4o-2024-08-06")
            .map(|r| r.model.as_str()),
        Some("gpt-4o*")
    );
    assert_eq!(
        config.route_for("mistral-7b").map(|r| r.model.as_str()),
        Some("*")
    );
    assert_eq!(
        config
            .route_for("*")
            .and_then(|r| r.targets[0].upstream_model.clone()),
        None,
        "passthrough"
    );
}

#[test]
fn the_older_policy_keeps_a_contested_model_and_the_newer_one_is_reported() {
    let older = policy(
        "team-a",
        "2026-01-01T00:00:00Z",
        json!({"routes": [{"model": "gpt-4o", "targets": [{"provider": "openai"}]}]}),
    );
    let newer = policy(
        "team-b",
        "2026-02-01T00:00:00Z",
        json!({"routes": [{"model": "gpt-4o", "targets": [{"provider": "azure"}]}, {"model": "llama", "targets": [{"provider": "local"}]}]}),
    );
    let out = compile(&pool(), &[newer, older], "us-east").expect("compiles");
    let gpt = out.config.route_for("gpt-4o").expect("routed");
    assert_eq!(gpt.policy, "team-a");
    assert_eq!(
        out.config.route_for("llama").map(|r| r.policy.as_str()),
        Some("team-b"),
        "the rest of the newer policy serves"
    );
    assert_eq!(out.conflicts.len(), 1);
    assert_eq!(
        (
            out.conflicts[0].winner.as_str(),
            out.conflicts[0].loser.as_str()
        ),
        ("team-a", "team-b")
    );
}

#[test]
fn a_broken_policy_does_not_take_down_another_teams_routes() {
    let good = policy(
        "good",
        "2026-01-01T00:00:00Z",
        json!({"routes": [{"model": "gpt-4o", "targets": [{"provider": "openai"}]}]}),
    );
    let bad = policy(
        "bad",
        "2026-01-02T00:00:00Z",
        json!({"routes": [{"model": "llama", "targets": [{"provider": "nope"}]}]}),
    );
    let out = compile(&pool(), &[good, bad], "us-east").expect("compiles");
    assert!(out.config.route_for("gpt-4o").is_some());
    assert!(out.config.route_for("llama").is_none());
    assert_eq!(
        out.rejected
            .iter()
            .map(|r| r.policy.as_str())
            .collect::<Vec<_>>(),
        ["bad"]
    );
}

#[test]
fn a_rejection_that_breaks_another_policys_fallback_rejects_that_one_too() {
    let a = policy(
        "a",
        "2026-01-01T00:00:00Z",
        json!({"routes": [{"model": "gpt-4o", "targets": [{"provider": "openai"}], "fallbacks": ["llama"]}]}),
    );
    let b = policy(
        "b",
        "2026-01-02T00:00:00Z",
        json!({"routes": [{"model": "llama", "targets": [{"provider": "nope"}]}]}),
    );
    let out = compile(&pool(), &[a, b], "us-east").expect("compiles");
    assert!(out.config.routes.is_empty());
    let mut rejected: Vec<&str> = out.rejected.iter().map(|r| r.policy.as_str()).collect();
    rejected.sort_unstable();
    assert_eq!(rejected, ["a", "b"]);
}

#[test]
fn policies_of_other_pools_or_namespaces_are_ignored() {
    let mut other_pool = policy(
        "x",
        "2026-01-01T00:00:00Z",
        json!({"routes": [{"model": "gpt-4o", "targets": [{"provider": "openai"}]}]}),
    );
    other_pool.spec.pool_ref.name = "other".into();
    let mut other_ns = policy(
        "y",
        "2026-01-01T00:00:00Z",
        json!({"routes": [{"model": "gpt-4o", "targets": [{"provider": "openai"}]}]}),
    );
    other_ns.metadata.namespace = Some("elsewhere".into());
    let out = compile(&pool(), &[other_pool, other_ns], "us-east").expect("compiles");
    assert!(out.config.routes.is_empty() && out.rejected.is_empty());
}

#[test]
fn endpoint_trailing_slash_is_normalised_and_drained_providers_stay_listed() {
    let mut p = pool();
    p.spec.providers[0].enabled = false;
    let out = compile(&p, &[], "us-east").expect("compiles");
    let openai = out.config.provider("openai").expect("listed");
    assert_eq!(openai.endpoint, "https://api.openai.com");
    assert!(!openai.enabled);
}

#[test]
fn a_rejected_edit_keeps_the_policys_previous_routes_and_the_providers_they_need() {
    let m = examples();
    let before = compile(&m.pools[0], &m.policies, "us-east").expect("compiles");
    assert!(before.rejected.is_empty());

    // A typo in one target rejects the whole policy.
    let mut policies = m.policies.clone();
    policies[0].spec.routes[0].targets[0].provider = "opneai".into();
    let mut now = compile(&m.pools[0], &policies, "us-east").expect("compiles");
    assert_eq!(now.rejected.len(), 1);
    assert!(
        now.config.routes.is_empty(),
        "without carry-over every model is gone"
    );
    let carried = now.carry_over(&before.config);
    assert_eq!(carried.len(), 1);
    assert_eq!(
        now.config, before.config,
        "the previous routes serve as they were"
    );

    // A provider the pool renamed comes along with the routes that still name it.
    let mut pool = m.pools[0].clone();
    let old = pool.spec.providers[0].name.clone();
    pool.spec.providers[0].name = format!("{old}-renamed");
    let mut now = compile(&pool, &m.policies, "us-east").expect("compiles");
    assert_eq!(now.rejected.len(), 1, "the policy still names {old}");
    now.carry_over(&before.config);
    let names: Vec<&str> = now
        .config
        .providers
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert!(
        names.contains(&old.as_str()) && names.contains(&format!("{old}-renamed").as_str()),
        "{names:?}"
    );
    assert_eq!(now.config.routes, before.config.routes);

    // A policy that is deleted takes its routes with it.
    let mut gone = compile(&m.pools[0], &[], "us-east").expect("compiles");
    assert!(gone.carry_over(&before.config).is_empty());
    assert!(gone.config.routes.is_empty());
}

/// Letters that do not compress: a name or text of `len` characters from `seed`.
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
fn the_largest_pool_fits_one_config_map_by_leaving_out_the_newest_policies() {
    // 32 providers of 32 models each, every name as long as the schema allows.
    let providers: Vec<serde_json::Value> = (0..32)
        .map(|p| {
            json!({"name": format!("p{p:02}-{}", noise(p, 59)), "type": "openaiCompatible",
                   "endpoint": format!("https://{}.example.com", noise(1000 + p, 60)), "region": "us-east",
                   "models": (0..32).map(|m| json!({"name": noise(p * 100 + m, 128)})).collect::<Vec<_>>()})
        })
        .collect();
    let mut pool = pool();
    pool.spec.providers = serde_json::from_value(json!(providers)).expect("providers");
    // Five policies of 64 routes: 16 targets each, a long refusal text each.
    let policies: Vec<RoutingPolicy> = (0..5u64)
        .map(|n| {
            let routes: Vec<serde_json::Value> = (0..64u64)
                .map(|r| {
                    let targets: Vec<serde_json::Value> = (0..16u64)
                        .map(|t| {
                            let p = (r + t) % 32;
                            json!({"provider": providers[p as usize]["name"], "model": noise(p * 100 + (r % 32), 128)})
                        })
                        .collect();
                    json!({"model": noise(10_000 + n * 100 + r, 128), "targets": targets,
                           "onContentPolicy": {"response": noise(20_000 + n * 100 + r, 4096)}})
                })
                .collect();
            policy(
                &format!("team-{n}"),
                &format!("2026-01-0{}T00:00:00Z", n + 1),
                json!({"routes": routes, "degradedResponse": {"message": noise(30_000 + n, 4096)}}),
            )
        })
        .collect();
    let mut out = compile(&pool, &policies, "us-east").expect("compiles");
    let rejected = |out: &crds::Compiled| -> Vec<String> {
        out.rejected.iter().map(|r| r.policy.clone()).collect()
    };
    assert_eq!(
        rejected(&out),
        ["team-4"],
        "a pool holds at most 256 routes"
    );
    assert!(
        out.rejected[0].errors[0].message.contains("limit of 256"),
        "{:?}",
        out.rejected[0].errors
    );
    out.fit(crds::CONFIG_MAP_DATA_MAX);
    let encoded = crds::encode_config(&out.config).len();
    assert!(encoded <= crds::CONFIG_MAP_DATA_MAX, "{encoded} bytes");
    let kept: std::collections::BTreeSet<&str> = out
        .config
        .routes
        .iter()
        .map(|r| r.policy.as_str())
        .collect();
    assert!(
        kept.contains("team-0"),
        "the oldest policy keeps its routes"
    );
    let dropped = rejected(&out);
    assert!(dropped.len() >= 2, "{dropped:?}");
    assert!(
        out.rejected
            .iter()
            .filter(|r| r.policy != "team-4")
            .all(|r| r.errors[0]
                .message
                .contains("more than the 921600 bytes a ConfigMap can hold")),
        "{:?}",
        out.rejected
    );
    eprintln!(
        "kept {} routes of {:?}; encoded {encoded} bytes",
        out.config.routes.len(),
        kept
    );
}

#[test]
fn a_large_configuration_is_stored_compressed_and_reads_back_the_same() {
    let m = examples();
    let small = compile(&m.pools[0], &m.policies, "us-east")
        .expect("compiles")
        .config;
    let crds::Encoded::Json(json) = crds::encode_config(&small) else {
        panic!("a small configuration stays readable JSON");
    };
    let data = std::collections::BTreeMap::from([(crds::GATEWAY_CONFIG_KEY.to_owned(), json)]);
    assert_eq!(crds::decode_config(Some(&data), None), Ok(small.clone()));

    let mut large = small;
    for i in 0..400 {
        let mut route = large.routes[0].clone();
        route.model = format!("{}-{i}", noise(i, 100));
        large.routes.push(route);
    }
    let crds::Encoded::Gzip(gz) = crds::encode_config(&large) else {
        panic!("a configuration over 256 KiB is compressed");
    };
    let binary = std::collections::BTreeMap::from([(
        crds::GATEWAY_CONFIG_GZ_KEY.to_owned(),
        k8s_openapi::ByteString(gz),
    )]);
    assert_eq!(crds::decode_config(None, Some(&binary)), Ok(large));
    let err = crds::decode_config(None, None).expect_err("nothing to read");
    assert!(err.contains("gateway.json"), "{err}");
}
