//! The Event publisher against a mocked API server: a repeat within the series window
//! counts on the first Event instead of creating another; anything else is a new Event.

use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper::{Request, Response};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::client::Body;
use kube::runtime::events::{Event, EventType};
use serde_json::Value;
use switchyard_operator::events::{Publisher, REMEMBERED};

/// Answers every request with its own body (as the API server echoes a created object),
/// recording "METHOD path" and the body.
async fn serve(mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>, log: Log) {
    while let Some((req, send)) = handle.next_request().await {
        let line = format!("{} {}", req.method(), req.uri().path());
        let bytes = req
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        log.lock().expect("log").push((line, body.clone()));
        // A merge patch is answered with a minimal Event, which is all the client parses.
        let answer = if body.get("kind").is_some() {
            body
        } else {
            serde_json::json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "x"}, "eventTime": null})
        };
        send.send_response(
            Response::builder()
                .status(201)
                .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                .expect("response"),
        );
    }
}

type Log = Arc<Mutex<Vec<(String, Value)>>>;

/// A publisher whose requests the mocked API server records.
fn publisher() -> (Publisher, Log, tokio::task::JoinHandle<()>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let log = Log::default();
    let server = tokio::spawn(serve(handle, log.clone()));
    let client = Client::new(service, "team");
    (
        Publisher::new(client, "switchyard-operator", "op-0"),
        log,
        server,
    )
}

fn pool(uid: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("switchyard.dev/v1alpha1".into()),
        kind: Some("ProviderPool".into()),
        name: Some("chat".into()),
        namespace: Some("team".into()),
        uid: Some(uid.into()),
        // Moves with every status write; a repeat is the same event regardless.
        resource_version: Some(uid.len().to_string()),
        ..ObjectReference::default()
    }
}

fn ready(note: &str) -> Event {
    Event {
        type_: EventType::Normal,
        reason: "Ready".into(),
        note: Some(note.into()),
        action: "Reconcile".into(),
        secondary: None,
    }
}

#[tokio::test]
async fn a_repeat_counts_on_the_first_event_and_anything_else_is_new() {
    let (events, log, server) = publisher();

    let mut moved = pool("u-1");
    events
        .publish(&ready("Ready=True: all regions"), &moved)
        .await
        .expect("first");
    moved.resource_version = Some("999".into());
    events
        .publish(&ready("Ready=True: all regions"), &moved)
        .await
        .expect("repeat");
    events
        .publish(&ready("Ready=True: all regions"), &moved)
        .await
        .expect("repeat again");
    events
        .publish(&ready("Ready=False: us-east not ready"), &moved)
        .await
        .expect("another note");
    events
        .publish(&ready("Ready=True: all regions"), &pool("u-2"))
        .await
        .expect("a recreated pool");
    server.abort();

    let log = log.lock().expect("log").clone();
    let lines: Vec<&str> = log.iter().map(|(l, _)| l.as_str()).collect();
    let first = log[0].1["metadata"]["name"].as_str().expect("a name");
    assert_eq!(
        lines,
        [
            "POST /apis/events.k8s.io/v1/namespaces/team/events",
            &format!("PATCH /apis/events.k8s.io/v1/namespaces/team/events/{first}"),
            &format!("PATCH /apis/events.k8s.io/v1/namespaces/team/events/{first}"),
            "POST /apis/events.k8s.io/v1/namespaces/team/events",
            "POST /apis/events.k8s.io/v1/namespaces/team/events",
        ],
        "{log:#?}"
    );
    let created = &log[0].1;
    assert_eq!(created["regarding"]["uid"], "u-1");
    assert_eq!(created["reportingController"], "switchyard-operator");
    assert_eq!(created["reportingInstance"], "op-0");
    assert_eq!(created["type"], "Normal");
    assert_eq!(created["reason"], "Ready");
    assert!(created["eventTime"].is_string(), "{created}");
    assert_eq!(log[1].1["series"]["count"], 2);
    assert_eq!(log[2].1["series"]["count"], 3);
    assert!(log[2].1["series"]["lastObservedTime"].is_string());
    assert_eq!(events.remembered(), 3);
}

#[tokio::test]
async fn what_is_remembered_for_series_is_bounded() {
    let (events, log, server) = publisher();
    for i in 0..REMEMBERED + 10 {
        events
            .publish(&ready("Ready=True"), &pool(&format!("u-{i}")))
            .await
            .expect("published");
    }
    server.abort();
    assert_eq!(events.remembered(), REMEMBERED);
    assert_eq!(log.lock().expect("log").len(), REMEMBERED + 10);
}
