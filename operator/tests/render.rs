//! `render` on the examples: golden objects, and the properties a platform team relies on.

use std::path::Path;

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use switchyard_operator::render::{Children, render};

fn children() -> Children {
    children_with(|_| {})
}

/// The examples' children, after `change` edits the pool.
fn children_with(change: impl FnOnce(&mut crds::ProviderPool)) -> Children {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let m = crds::manifests::load(&dir, "default").expect("examples load");
    let pool = &m.pools[0];
    let mut pool = pool.clone();
    pool.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
    change(&mut pool);
    let configs: Vec<_> = pool
        .spec
        .regions
        .iter()
        .map(|r| {
            crds::compile(&pool, &m.policies, &r.name)
                .expect("compiles")
                .config
        })
        .collect();
    render(&pool, &configs, "switchyard-gateway:test")
}

#[test]
fn examples_render_to_the_golden_objects() {
    let c = children();
    let mut docs = Vec::new();
    docs.push(serde_norway::to_string(&c.service_account).expect("yaml"));
    docs.push(serde_norway::to_string(&c.role).expect("yaml"));
    docs.push(serde_norway::to_string(&c.role_binding).expect("yaml"));
    for d in &c.deployments {
        docs.push(serde_norway::to_string(d).expect("yaml"));
    }
    for s in &c.services {
        docs.push(serde_norway::to_string(s).expect("yaml"));
    }
    for p in &c.disruption_budgets {
        docs.push(serde_norway::to_string(p).expect("yaml"));
    }
    for cm in &c.config_maps {
        let mut cm = cm.clone();
        cm.data = None; // the config itself is pinned by crds' compile goldens
        docs.push(serde_norway::to_string(&cm).expect("yaml"));
    }
    let actual = docs.join("---\n");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/chat.yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).expect("golden written");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} differs; inspect and rerun with UPDATE_GOLDEN=1\n{actual}",
        path.display()
    );
}

fn by_region<'a>(c: &'a Children, region: &str) -> &'a Deployment {
    c.deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some(&format!("chat-{region}")))
        .expect("a deployment per region")
}

#[test]
fn each_region_gets_a_pinned_hardened_gateway() {
    let c = children();
    assert_eq!(c.deployments.len(), 3);
    assert_eq!(c.config_maps.len(), 3);
    assert_eq!(c.services.len(), 4, "one per region plus the pool-wide one");
    assert_eq!(
        c.disruption_budgets.len(),
        3,
        "replicas > 1 in every region"
    );
    let d = by_region(&c, "eu-west");
    let pod = d.spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|s| s.get("topology.kubernetes.io/region"))
            .map(String::as_str),
        Some("eu-west")
    );
    let sc = pod.containers[0]
        .security_context
        .as_ref()
        .expect("security context");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(
        pod.security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root),
        Some(true)
    );
    assert_eq!(
        pod.security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.as_ref())
            .map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    assert!(
        d.metadata
            .owner_references
            .as_ref()
            .is_some_and(|o| o[0].controller == Some(true))
    );
}

#[test]
fn the_gateway_role_grants_only_named_objects() {
    let c = children();
    let rules = c.role.rules.clone().unwrap_or_default();
    for rule in &rules {
        assert!(
            rule.resource_names.as_ref().is_some_and(|n| !n.is_empty()),
            "every rule is scoped by name: {rule:?}"
        );
        assert!(
            !rule
                .verbs
                .iter()
                .any(|v| v == "*" || v == "create" || v == "delete" || v == "update"),
            "{rule:?}"
        );
    }
    let secrets = rules
        .iter()
        .find(|r| r.resources.as_deref() == Some(&["secrets".to_owned()][..]))
        .expect("secrets rule");
    assert_eq!(
        secrets.resource_names.clone().unwrap_or_default(),
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
fn long_names_are_shortened_deterministically() {
    let long = "a".repeat(80);
    let name = switchyard_operator::render::child_name(&long);
    assert!(name.len() <= 63);
    assert_eq!(name, switchyard_operator::render::child_name(&long));
}

#[test]
fn a_private_ca_bundle_is_mounted_and_passed_to_every_gateway() {
    let c = children_with(|pool| {
        pool.spec.gateway.trusted_ca = Some(crds::pool::ConfigMapKeyRef {
            name: "internal-ca".into(),
            key: "bundle.pem".into(),
        });
    });
    assert_eq!(c.deployments.len(), 3);
    for d in &c.deployments {
        let pod = d.spec.template.spec.as_ref().expect("pod spec");
        let args = pod.containers[0].args.clone().unwrap_or_default();
        let at = args
            .iter()
            .position(|a| a == "--ca-file")
            .expect("--ca-file passed");
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "trusted-ca")
            .expect("mounted");
        assert_eq!(args[at + 1], format!("{}/ca.pem", mount.mount_path));
        assert_eq!(mount.read_only, Some(true));
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "trusted-ca")
            .and_then(|v| v.config_map.clone())
            .expect("from the ConfigMap");
        assert_eq!(volume.name, "internal-ca");
        let items = volume.items.unwrap_or_default();
        assert_eq!(
            (items[0].key.as_str(), items[0].path.as_str()),
            ("bundle.pem", "ca.pem")
        );
    }
}

/// The gateway container's environment in `region`, in order.
fn gateway_env<'a>(c: &'a Children, region: &str) -> &'a [k8s_openapi::api::core::v1::EnvVar] {
    by_region(c, region)
        .spec
        .template
        .spec
        .as_ref()
        .expect("pod")
        .containers[0]
        .env
        .as_deref()
        .unwrap_or_default()
}

#[test]
fn tracing_sets_the_standard_opentelemetry_environment_and_is_off_otherwise() {
    let values = |c: &Children| -> std::collections::BTreeMap<String, String> {
        gateway_env(c, "us-east")
            .iter()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    };
    let off = children();
    assert!(
        values(&off).keys().all(|k| !k.starts_with("OTEL_")),
        "no OTEL_* variable without spec.gateway.tracing"
    );
    let on = children_with(|pool| {
        pool.spec.gateway.tracing = Some(crds::pool::TracingSettings {
            endpoint: "http://otel-collector.observability:4318".into(),
            sampling_ratio: 0.25,
        });
    });
    let e = values(&on);
    assert_eq!(
        e["OTEL_EXPORTER_OTLP_ENDPOINT"],
        "http://otel-collector.observability:4318"
    );
    assert_eq!(e["OTEL_TRACES_SAMPLER"], "parentbased_traceidratio");
    assert_eq!(e["OTEL_TRACES_SAMPLER_ARG"], "0.25");
    assert_eq!(e["OTEL_EXPORTER_OTLP_PROTOCOL"], "http/protobuf");
    let resource = &e["OTEL_RESOURCE_ATTRIBUTES"];
    assert!(resource.contains("switchyard.region=us-east"), "{resource}");
    assert!(resource.contains("k8s.pod.name=$(POD_NAME)"), "{resource}");
    // POD_NAME must come first for the kubelet to expand it.
    let pos = |n: &str| {
        gateway_env(&on, "us-east")
            .iter()
            .position(|e| e.name == n)
            .expect(n)
    };
    assert!(pos("POD_NAME") < pos("OTEL_RESOURCE_ATTRIBUTES"));
}

#[test]
fn a_cached_config_map_holds_a_digest_and_the_served_routes_instead_of_its_data() {
    use switchyard_operator::cache::{CACHED_DATA_DIGEST, Grouped, data_digest, served_routes};
    let desired = children().config_maps[0].clone();
    let config = crds::decode_config(desired.data.as_ref(), desired.binary_data.as_ref())
        .expect("a compiled configuration");
    let served: Vec<(String, String)> = config
        .routes
        .into_iter()
        .map(|r| (r.policy, r.model))
        .collect();
    assert!(
        served.iter().any(|(policy, _)| !policy.is_empty()),
        "{served:?}"
    );
    let mut cached = desired.clone();
    // An annotation on the live object cannot stand in for what the data says.
    cached.annotations_mut().insert(
        switchyard_operator::cache::CACHED_SERVED.to_owned(),
        r#"[["someone-else","spoofed"]]"#.to_owned(),
    );
    cached.trim();
    assert!(cached.data.is_none() && cached.binary_data.is_none());
    assert_eq!(served_routes(&cached), served);
    let digest = &cached.annotations()[CACHED_DATA_DIGEST];
    assert_eq!(*digest, data_digest(&desired));
    // An edited configuration no longer matches.
    let mut edited = desired.clone();
    for value in edited.data.iter_mut().flat_map(|d| d.values_mut()) {
        value.push(' ');
    }
    for value in edited.binary_data.iter_mut().flat_map(|d| d.values_mut()) {
        value.0.push(0);
    }
    assert_ne!(*digest, data_digest(&edited));
}
