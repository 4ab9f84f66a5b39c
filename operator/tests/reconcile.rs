//! `reconcile_pool` against a mocked API server and caches filled with the same world: the
//! exact requests it makes. An unchanged world costs nothing; drift costs exactly the
//! write that repairs it; a child the cache lacks is read before it is created.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crds::k8s::Time;
use crds::{ProviderPool, RoutingPolicy};
use hyper::{Request, Response};
use kube::client::Body;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use switchyard_operator::cache::{Cache, Caches, Grouped};
use switchyard_operator::controller::{Context, reconcile_pool};
use switchyard_operator::events::Publisher;
use switchyard_operator::metrics::Metrics;
use switchyard_operator::render::{render, stamp};
use switchyard_operator::status::{RegionObservation, pool_status};

const NS: &str = "team";

fn pool() -> ProviderPool {
    let mut p: ProviderPool = serde_json::from_value(json!({
        "apiVersion": "switchyard.dev/v1alpha1", "kind": "ProviderPool",
        "metadata": {"name": "chat", "namespace": NS, "uid": "u-1", "generation": 1},
        "spec": {"regions": [{"name": "us-east", "replicas": 1}],
                 "providers": [{"name": "a", "type": "openaiCompatible", "endpoint": "http://a", "region": "us-east", "models": [{"name": "m"}]}]}
    }))
    .expect("pool");
    let config = crds::compile(&p, &[policy()], "us-east")
        .expect("compiles")
        .config;
    let revision =
        switchyard_operator::render::revision(&switchyard_operator::render::config_json(&config));
    let obs = [RegionObservation {
        name: "us-east".into(),
        desired: 1,
        ready: 1,
        revision,
        routes: config.routes.len(),
        stuck: None,
    }];
    let now = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).expect("time"));
    p.status =
        Some(serde_json::from_value(pool_status(&p, &obs, None, &[], &now)).expect("status"));
    p
}

fn policy() -> RoutingPolicy {
    serde_json::from_value(json!({
        "apiVersion": "switchyard.dev/v1alpha1", "kind": "RoutingPolicy",
        "metadata": {"name": "chat", "namespace": NS},
        "spec": {"poolRef": {"name": "chat"}, "routes": [{"model": "m", "targets": [{"provider": "a"}]}]}
    }))
    .expect("policy")
}

/// What the mocked API server holds: every child as the operator last applied it.
fn world() -> Vec<(String, Value)> {
    let p = pool();
    let config = crds::compile(&p, &[policy()], "us-east")
        .expect("compiles")
        .config;
    let mut c = render(&p, &[config], "gw:1");
    let mut objects = Vec::new();
    fn add<K: Resource<DynamicType = ()> + serde::Serialize>(
        objects: &mut Vec<(String, Value)>,
        mut obj: K,
    ) {
        stamp(&mut obj);
        let path = format!(
            "{}/{}",
            K::url_path(&(), obj.namespace().as_deref()),
            obj.name_any()
        );
        objects.push((path, serde_json::to_value(&obj).expect("json")));
    }
    add(&mut objects, c.service_account.clone());
    add(&mut objects, c.role.clone());
    add(&mut objects, c.role_binding.clone());
    for cm in c.config_maps.drain(..) {
        add(&mut objects, cm);
    }
    for svc in c.services.drain(..) {
        add(&mut objects, svc);
    }
    for mut d in c.deployments.drain(..) {
        stamp(&mut d);
        d.status = Some(k8s_openapi::api::apps::v1::DeploymentStatus {
            ready_replicas: Some(1),
            ..Default::default()
        });
        let path = format!("/apis/apps/v1/namespaces/{NS}/deployments/{}", d.name_any());
        // stamp() above already set the hash; keep it when adding.
        objects.push((path, serde_json::to_value(&d).expect("json")));
    }
    objects
}

/// Serves requests from `objects`, recording "METHOD path?query" of each.
async fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    objects: Vec<(String, Value)>,
    log: Arc<Mutex<Vec<String>>>,
) {
    while let Some((req, send)) = handle.next_request().await {
        let method = req.method().to_string();
        let uri = req.uri().to_string();
        log.lock().expect("log").push(format!("{method} {uri}"));
        let path = req.uri().path().to_owned();
        let body = if method == "GET"
            && req
                .uri()
                .query()
                .is_some_and(|q| q.contains("labelSelector"))
        {
            // list_metadata: the names of what exists under that path.
            let items: Vec<Value> = objects
                .iter()
                .filter(|(p, _)| p.rsplit_once('/').is_some_and(|(dir, _)| dir == path))
                .map(|(_, o)| json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": o["metadata"]}))
                .collect();
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": items})
        } else if path.ends_with("/routingpolicies") {
            json!({"apiVersion": "switchyard.dev/v1alpha1", "kind": "RoutingPolicyList", "metadata": {}, "items": [policy()]})
        } else if method == "GET" {
            match objects.iter().find(|(p, _)| *p == path) {
                Some((_, o)) => o.clone(),
                None => {
                    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
                    let resp = Response::builder()
                        .status(404)
                        .body(Body::from(serde_json::to_vec(&status).expect("json")))
                        .expect("response");
                    send.send_response(resp);
                    continue;
                }
            }
        } else if method == "PATCH" {
            // Server-side apply answers with the object as applied.
            use http_body_util::BodyExt;
            let bytes = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            if path.ends_with("/status") {
                // The whole object, as the API server answers a status apply.
                serde_json::to_value(pool()).expect("json")
            } else {
                serde_json::from_slice(&bytes).unwrap_or(Value::Null)
            }
        } else {
            json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "metadata": {"name": "x"}})
        };
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&body).expect("json")))
                .expect("response"),
        );
    }
}

/// The caches as the watches would fill them from `objects`.
fn caches(objects: &[(String, Value)]) -> Caches {
    fn of<K: Grouped + DeserializeOwned>(objects: &[(String, Value)], plural: &str) -> Cache<K> {
        let segment = format!("/{plural}/");
        Cache::filled(
            objects
                .iter()
                .filter(|(path, _)| path.contains(&segment))
                .map(|(_, o)| serde_json::from_value(o.clone()).expect("typed object")),
        )
    }
    Caches {
        pools: Cache::filled([pool()]),
        policies: Cache::filled([policy()]),
        secrets: Cache::filled([]),
        deployments: of(objects, "deployments"),
        config_maps: of(objects, "configmaps"),
        services: of(objects, "services"),
        disruption_budgets: of(objects, "poddisruptionbudgets"),
        service_accounts: of(objects, "serviceaccounts"),
        roles: of(objects, "roles"),
        role_bindings: of(objects, "rolebindings"),
        pods: Cache::filled([]),
    }
}

/// Reconciles the pool against an API server holding `objects` and caches holding
/// `cached`; returns the requests sent.
async fn run(objects: Vec<(String, Value)>, cached: &[(String, Value)]) -> Vec<String> {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NS);
    let log = Arc::new(Mutex::new(Vec::new()));
    let server = tokio::spawn(serve(handle, objects, log.clone()));
    let ctx = Arc::new(Context {
        events: Arc::new(Publisher::new(client.clone(), "test", "test-0")),
        client,
        gateway_image: "gw:1".into(),
        metrics: Arc::new(Metrics::default()),
        caches: caches(cached),
    });
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        reconcile_pool(Arc::new(pool()), ctx),
    )
    .await;
    server.abort();
    assert!(matches!(result, Ok(Ok(_))), "reconcile failed: {result:?}");
    log.lock().expect("log").clone()
}

#[tokio::test]
async fn an_unchanged_world_costs_no_request() {
    let world = world();
    let log = run(world.clone(), &world).await;
    assert_eq!(log, Vec::<String>::new(), "nothing changed: {log:#?}");
}

#[tokio::test]
async fn a_drifted_config_map_is_repaired_with_one_server_side_apply() {
    let mut objects = world();
    for (path, obj) in &mut objects {
        if path.ends_with("/configmaps/chat-us-east") {
            obj["data"]["gateway.json"] = json!("{}");
            obj["metadata"]["annotations"]["switchyard.dev/applied-hash"] = json!("stale");
        }
    }
    let log = run(objects.clone(), &objects).await;
    assert_eq!(
        log,
        [
            "PATCH /api/v1/namespaces/team/configmaps/chat-us-east?&force=true&fieldManager=switchyard-operator"
        ],
        "{log:#?}"
    );
}

#[tokio::test]
async fn a_child_the_cache_lacks_is_read_before_it_is_created() {
    let cached = world();
    let objects: Vec<(String, Value)> = cached
        .iter()
        .filter(|(path, _)| !path.ends_with("/serviceaccounts/chat-gateway"))
        .cloned()
        .collect();
    let cached: Vec<(String, Value)> = objects.clone();
    let log = run(objects, &cached).await;
    assert_eq!(
        log,
        [
            "GET /api/v1/namespaces/team/serviceaccounts/chat-gateway",
            "PATCH /api/v1/namespaces/team/serviceaccounts/chat-gateway?&force=true&fieldManager=switchyard-operator",
        ],
        "{log:#?}"
    );
}

#[tokio::test]
async fn an_object_someone_else_made_under_a_childs_name_is_read_and_left_alone() {
    let mut objects = world();
    for (path, obj) in &mut objects {
        if path.ends_with("/services/chat") {
            obj["metadata"]["ownerReferences"] = json!([]);
            obj["metadata"]["labels"] = json!({});
        }
    }
    // The watch selects the operator's label, so the cache never sees that Service.
    let cached: Vec<(String, Value)> = objects
        .iter()
        .filter(|(path, _)| !path.ends_with("/services/chat"))
        .cloned()
        .collect();
    let log = run(objects, &cached).await;
    assert_eq!(
        log[0], "GET /api/v1/namespaces/team/services/chat",
        "{log:#?}"
    );
    assert!(
        !log.iter()
            .any(|l| l.contains("/services/chat?") || l.starts_with("DELETE")),
        "the Service is neither applied nor deleted: {log:#?}"
    );
    assert!(
        log.iter().any(|l| l.starts_with(
            "PATCH /apis/switchyard.dev/v1alpha1/namespaces/team/providerpools/chat/status"
        )),
        "the pool's status says why: {log:#?}"
    );
}

#[tokio::test]
async fn a_child_of_a_removed_region_is_pruned() {
    let mut objects = world();
    let mut extra = objects
        .iter()
        .find(|(p, _)| p.ends_with("/deployments/chat-us-east"))
        .expect("deployment")
        .1
        .clone();
    extra["metadata"]["name"] = json!("chat-eu-west");
    objects.push((
        format!("/apis/apps/v1/namespaces/{NS}/deployments/chat-eu-west"),
        extra,
    ));
    let log = run(objects.clone(), &objects).await;
    assert_eq!(log.len(), 1, "{log:#?}");
    assert!(
        log[0].starts_with("DELETE /apis/apps/v1/namespaces/team/deployments/chat-eu-west"),
        "{log:#?}"
    );
}
