//! The admin API against arbitrary input (property-based fuzzing, bounded):
//! whatever the JSON body or query string, every answer is a 2xx or a 4xx
//! with the documented `{"error": ...}` body, never a 5xx, and the server
//! keeps serving.

mod common;

use common::Server;
use proptest::{
    prelude::*,
    strategy::{Strategy, ValueTree},
    test_runner::TestRunner,
};
use serde_json::Value;

/// Arbitrary JSON, nested a few levels.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,24}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("files".to_owned()),
                    Just("body".to_owned()),
                    Just("selector".to_owned()),
                    Just("config".to_owned()),
                    Just("version".to_owned()),
                    Just("assignment".to_owned()),
                    Just("stages".to_owned()),
                    Just("name".to_owned()),
                    ".{0,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[tokio::test]
async fn arbitrary_bodies_and_queries_never_get_a_server_error() {
    let server = Server::start().await;
    let admin = &server.admin;
    // Something real to aim at, so bodies reach the deeper checks.
    admin
        .create_config("base", "c.yaml", "x: 1", "text/yaml")
        .await
        .unwrap();
    admin.assign("all", "", "base").await.unwrap();
    let mut runner = TestRunner::deterministic();
    let bodies = json();
    let queries = ".{0,40}";
    let routes = [
        (reqwest::Method::POST, "/api/v1/configs/base/versions"),
        (reqwest::Method::PUT, "/api/v1/assignments/fuzzed"),
        (reqwest::Method::POST, "/api/v1/rollouts"),
        (reqwest::Method::POST, "/api/v1/keys"),
    ];
    for case in 0..400 {
        let body = bodies.new_tree(&mut runner).unwrap().current();
        let (method, path) = &routes[case % routes.len()];
        let (status, answer) = admin.request(method.clone(), path, Some(body.clone())).await.unwrap();
        assert!(status < 500, "{method} {path} with {body} got {status}: {answer}");
        if status >= 400 {
            assert!(answer["error"].is_string(), "{method} {path} with {body}: {answer}");
        }
        let query: String = queries.new_tree(&mut runner).unwrap().current();
        let encoded: String = query.bytes().map(|b| format!("%{b:02X}")).collect();
        let (status, answer) = admin
            .request(
                reqwest::Method::GET,
                &format!("/api/v1/agents?selector={encoded}"),
                None,
            )
            .await
            .unwrap();
        assert!(
            status == 200 || status == 400,
            "selector {query:?} got {status}: {answer}"
        );
    }
    assert_eq!(
        admin.request(reqwest::Method::GET, "/readyz", None).await.unwrap().0,
        200
    );
    server.stop().await;
}
