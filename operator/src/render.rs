//! Pure rendering: a ProviderPool and its compiled per-region configs in, the desired
//! Kubernetes objects out. No I/O here, so every object is pinned by golden tests.

use std::collections::{BTreeMap, BTreeSet};

use crds::pool::Region;
use crds::{Encoded, GATEWAY_CONFIG_GZ_KEY, GATEWAY_CONFIG_KEY, GatewayConfig, ProviderPool};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SeccompProfile, SecurityContext, Service, ServiceAccount,
    ServicePort, ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

/// The field manager every operator write uses.
pub const MANAGER: &str = "switchyard-operator";
/// Label naming the pool a child belongs to.
pub const POOL_LABEL: &str = "switchyard.dev/pool";
/// Label naming the region a child serves.
pub const REGION_LABEL: &str = "switchyard.dev/region";
/// Annotation with the hash of what the operator last applied, to skip no-op writes.
pub const HASH_ANNOTATION: &str = "switchyard.dev/applied-hash";
/// Annotation with the compiled config's revision.
pub const REVISION_ANNOTATION: &str = "switchyard.dev/config-revision";

/// Everything the operator wants to exist for one pool.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Children {
    /// One per region.
    pub config_maps: Vec<ConfigMap>,
    /// One per region.
    pub deployments: Vec<Deployment>,
    /// One per region plus the pool-wide one.
    pub services: Vec<Service>,
    /// One per region with more than one replica.
    pub disruption_budgets: Vec<PodDisruptionBudget>,
    /// The gateways' identity.
    pub service_account: ServiceAccount,
    /// What the gateways may do.
    pub role: Role,
    /// Binds the role to the account.
    pub role_binding: RoleBinding,
}

/// A DNS-1035 label of at most 63 characters: `base`, or a truncation of it plus a hash.
pub fn child_name(base: &str) -> String {
    if base.len() <= 63 {
        return base.to_owned();
    }
    let hash = format!("{:08x}", fnv1a(base.as_bytes()) as u32);
    let keep: String = base.chars().take(63 - 9).collect();
    format!("{}-{hash}", keep.trim_end_matches('-'))
}

/// A gateway's resources when neither the region nor the pool sets any: requests, so the
/// pods are not the first evicted (BestEffort) and are scheduled where they fit, and a
/// memory limit above what the gateway's default limits let it hold (a 256 MiB buffer
/// budget, a 64 MiB replay store and about 20 MiB of its own). No CPU limit: throttling
/// The gateway container's environment: settings newer than some gateway images (so a
/// pool pinned to an older image still starts), and the standard OpenTelemetry variables
/// when the pool asks for traces.
fn gateway_env(pool: &ProviderPool, region: &Region, name: &str) -> Vec<EnvVar> {
    let mut env = vec![
        // Endpoint removal reaches every kube-proxy a moment after SIGTERM; serving
        // until then drops no request. Delay + drain (30 s) stay within the grace
        // period.
        EnvVar {
            name: "SWITCHYARD_SHUTDOWN_DELAY_SECONDS".into(),
            value: Some(SHUTDOWN_DELAY_SECONDS.to_string()),
            ..EnvVar::default()
        },
        // Clients reach the API port through the Services; what the gateway knows of
        // providers and routes stays on a port they do not.
        EnvVar {
            name: "SWITCHYARD_ADMIN_LISTEN".into(),
            value: Some(format!("0.0.0.0:{}", pool.spec.gateway.admin_port)),
            ..EnvVar::default()
        },
        EnvVar {
            name: "POD_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
    ];
    if let Some(tracing) = &pool.spec.gateway.tracing {
        let var = |name: &str, value: String| EnvVar {
            name: name.into(),
            value: Some(value),
            ..EnvVar::default()
        };
        // Every name here is a DNS label, so none needs percent-encoding; POD_NAME is
        // expanded by the kubelet, as it is defined above.
        let resource = format!(
            "k8s.namespace.name={},k8s.deployment.name={name},k8s.pod.name=$(POD_NAME),switchyard.pool={},switchyard.region={}",
            pool.namespace().unwrap_or_default(),
            pool.name_any(),
            region.name,
        );
        env.extend([
            var("OTEL_EXPORTER_OTLP_ENDPOINT", tracing.endpoint.clone()),
            var("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
            var("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()),
            var(
                "OTEL_TRACES_SAMPLER_ARG",
                tracing.sampling_ratio.to_string(),
            ),
            var("OTEL_SERVICE_NAME", "switchyard-gateway".into()),
            var("OTEL_RESOURCE_ATTRIBUTES", resource),
        ]);
    }
    env
}

/// adds latency to every request.
fn default_gateway_resources() -> ResourceRequirements {
    let quantity = |q: &str| Quantity(q.to_owned());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), quantity("100m")),
            ("memory".to_owned(), quantity("128Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_owned(), quantity("512Mi"))])),
        ..ResourceRequirements::default()
    }
}

/// FNV-1a, 64 bits: stable across Rust versions, unlike `DefaultHasher`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Names of a pool's children.
pub fn regional_name(pool: &str, region: &str) -> String {
    child_name(&format!("{pool}-{region}"))
}

/// Name of the gateways' ServiceAccount, Role and RoleBinding.
pub fn gateway_identity(pool: &str) -> String {
    child_name(&format!("{pool}-gateway"))
}

/// The recommended labels, plus the pool (and region) selector labels.
pub fn labels(pool: &str, region: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "switchyard-gateway".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), pool.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "gateway".to_owned(),
        ),
        (
            "app.kubernetes.io/part-of".to_owned(),
            "switchyard".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGER.to_owned(),
        ),
        (POOL_LABEL.to_owned(), pool.to_owned()),
    ]);
    if let Some(region) = region {
        l.insert(REGION_LABEL.to_owned(), region.to_owned());
    }
    l
}

fn selector(pool: &str, region: Option<&str>) -> BTreeMap<String, String> {
    let mut s = BTreeMap::from([(POOL_LABEL.to_owned(), pool.to_owned())]);
    if let Some(region) = region {
        s.insert(REGION_LABEL.to_owned(), region.to_owned());
    }
    s
}

fn meta(
    pool: &ProviderPool,
    name: String,
    region: Option<&str>,
    owner: &OwnerReference,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: pool.namespace(),
        labels: Some(labels(&pool.name_any(), region)),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// The compiled config as the ConfigMap holds it: pretty, deterministic JSON.
pub fn config_json(config: &GatewayConfig) -> String {
    serde_json::to_string_pretty(config).unwrap_or_default() + "\n"
}

/// Renders every child of `pool`. `configs` holds one compiled config per region, in
/// the pool's region order.
pub fn render(pool: &ProviderPool, configs: &[GatewayConfig], default_image: &str) -> Children {
    let name = pool.name_any();
    let owner = pool.controller_owner_ref(&()).unwrap_or_default();
    let identity = gateway_identity(&name);
    let port = pool.spec.gateway.port;
    let image = pool
        .spec
        .gateway
        .image
        .clone()
        .unwrap_or_else(|| default_image.to_owned());
    let mut children = Children::default();
    let mut secrets = BTreeSet::new();
    let mut config_map_names = Vec::new();

    for (region, config) in pool.spec.regions.iter().zip(configs) {
        let child = regional_name(&name, &region.name);
        secrets.extend(config.referenced_secrets());
        config_map_names.push(child.clone());
        let json = config_json(config);
        let mut cm_meta = meta(pool, child.clone(), Some(&region.name), &owner);
        cm_meta.annotations = Some(BTreeMap::from([(
            REVISION_ANNOTATION.to_owned(),
            revision(&json),
        )]));
        let (data, binary_data) = match crds::encode_config(config) {
            Encoded::Json(json) => (
                Some(BTreeMap::from([(GATEWAY_CONFIG_KEY.to_owned(), json)])),
                None,
            ),
            Encoded::Gzip(gz) => (
                None,
                Some(BTreeMap::from([(
                    GATEWAY_CONFIG_GZ_KEY.to_owned(),
                    ByteString(gz),
                )])),
            ),
        };
        children.config_maps.push(ConfigMap {
            metadata: cm_meta,
            data,
            binary_data,
            ..ConfigMap::default()
        });
        children.deployments.push(deployment(
            pool, region, &child, &identity, &image, port, &owner,
        ));
        children.services.push(service(
            pool,
            child.clone(),
            Some(&region.name),
            port,
            &owner,
        ));
        // With external replicas the count is unknown here, so the budget is always made.
        if region.replicas > 1 || pool.spec.gateway.external_replicas {
            children.disruption_budgets.push(PodDisruptionBudget {
                metadata: meta(pool, child.clone(), Some(&region.name), &owner),
                spec: Some(PodDisruptionBudgetSpec {
                    max_unavailable: Some(IntOrString::Int(1)),
                    selector: Some(LabelSelector {
                        match_labels: Some(selector(&name, Some(&region.name))),
                        ..LabelSelector::default()
                    }),
                    ..PodDisruptionBudgetSpec::default()
                }),
                ..PodDisruptionBudget::default()
            });
        }
    }
    children
        .services
        .push(service(pool, child_name(&name), None, port, &owner));

    children.service_account = ServiceAccount {
        metadata: meta(pool, identity.clone(), None, &owner),
        automount_service_account_token: Some(true),
        ..ServiceAccount::default()
    };
    let mut rules = vec![
        PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(config_map_names),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        },
        PolicyRule {
            api_groups: Some(vec![crds::API_GROUP.into()]),
            resources: Some(vec!["providerpools/status".into()]),
            resource_names: Some(vec![name.clone()]),
            verbs: vec!["get".into(), "patch".into()],
            ..PolicyRule::default()
        },
    ];
    // An empty resourceNames list would grant every Secret: only add the rule when the
    // configs reference some.
    if !secrets.is_empty() {
        rules.insert(
            1,
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["secrets".into()]),
                resource_names: Some(secrets.into_iter().collect()),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                ..PolicyRule::default()
            },
        );
    }
    children.role = Role {
        metadata: meta(pool, identity.clone(), None, &owner),
        rules: Some(rules),
    };
    children.role_binding = RoleBinding {
        metadata: meta(pool, identity.clone(), None, &owner),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: identity.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: identity,
            namespace: pool.namespace(),
            ..Subject::default()
        }]),
    };
    children
}

/// Revision of a rendered config: a short content hash.
pub fn revision(json: &str) -> String {
    format!("{:016x}", fnv1a(json.as_bytes()))
}

fn service(
    pool: &ProviderPool,
    name: String,
    region: Option<&str>,
    port: i32,
    owner: &OwnerReference,
) -> Service {
    Service {
        metadata: meta(pool, name, region, owner),
        spec: Some(ServiceSpec {
            selector: Some(selector(&pool.name_any(), region)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Seconds a gateway keeps serving after SIGTERM (see the gateway's `--shutdown-delay-seconds`).
const SHUTDOWN_DELAY_SECONDS: i64 = 5;

/// Where a pool's private CA bundle is mounted in its gateway pods.
const TRUSTED_CA_DIR: &str = "/etc/switchyard/trusted-ca";

fn deployment(
    pool: &ProviderPool,
    region: &Region,
    name: &str,
    identity: &str,
    image: &str,
    port: i32,
    owner: &OwnerReference,
) -> Deployment {
    let pool_name = pool.name_any();
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let resources = region
        .resources
        .clone()
        .or_else(|| pool.spec.gateway.resources.clone())
        .unwrap_or_else(default_gateway_resources);
    let mut args = vec![
        "--configmap".into(),
        name.into(),
        "--namespace".into(),
        pool.namespace().unwrap_or_default(),
        "--region".into(),
        region.name.clone(),
        "--listen".into(),
        format!("0.0.0.0:{port}"),
    ];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    }];
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(Default::default()),
        ..Volume::default()
    }];
    if let Some(ca) = &pool.spec.gateway.trusted_ca {
        args.extend(["--ca-file".to_owned(), format!("{TRUSTED_CA_DIR}/ca.pem")]);
        mounts.push(VolumeMount {
            name: "trusted-ca".into(),
            mount_path: TRUSTED_CA_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "trusted-ca".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: ca.name.clone(),
                items: Some(vec![KeyToPath {
                    key: ca.key.clone(),
                    path: "ca.pem".into(),
                    ..KeyToPath::default()
                }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let container = Container {
        name: "gateway".into(),
        image: Some(image.into()),
        args: Some(args),
        env: Some(gateway_env(pool, region, name)),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: port,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: pool.spec.gateway.admin_port,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    Deployment {
        metadata: meta(pool, name.to_owned(), Some(&region.name), owner),
        spec: DeploymentSpec {
            replicas: (!pool.spec.gateway.external_replicas).then_some(region.replicas),
            // A replacement is ready before an old gateway goes, at any replica count.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            selector: LabelSelector {
                match_labels: Some(selector(&pool_name, Some(&region.name))),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&pool_name, Some(&region.name))),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(identity.into()),
                    node_selector: Some(region.effective_node_selector()),
                    tolerations: region.tolerations.clone(),
                    topology_spread_constraints: Some(vec![TopologySpreadConstraint {
                        max_skew: 1,
                        topology_key: "topology.kubernetes.io/zone".into(),
                        when_unsatisfiable: "ScheduleAnyway".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector(&pool_name, Some(&region.name))),
                            ..LabelSelector::default()
                        }),
                        ..TopologySpreadConstraint::default()
                    }]),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    termination_grace_period_seconds: Some(45),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

/// Stamps each object with the hash of its own content, so a later reconcile can tell a
/// no-op from a change without writing.
pub fn stamp<K: Resource + serde::Serialize>(obj: &mut K) -> String {
    let hash = format!(
        "{:016x}",
        fnv1a(serde_json::to_string(obj).unwrap_or_default().as_bytes())
    );
    obj.meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_ANNOTATION.to_owned(), hash.clone());
    hash
}
