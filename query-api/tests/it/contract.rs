//! The OpenAPI document tells the truth: every operation, sent over a real socket requests that
//! keep each promise of the document and requests that break each constraint (formats, enums,
//! bounds, patterns, lengths), no or a bad token, a malformed path id or query value and a
//! method the path does not have, answers with a documented status, media type and body
//! (`canopy_http::contract`); and the docs page loads the served document.

use std::collections::HashMap;

use canopy_domain::Role;
use canopy_http::contract::{Setup, check};
use serde_json::{Value, json};

use crate::support::{Stack, token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_its_document_says() {
    let stack = Stack::start().await;
    let (session, feature, consistent_with) = stack.scenario("Contract").await;
    let owner = token(Role::Owner, "owner", "w1");
    let prompts = stack
        .get(
            &owner,
            &format!("/prompts?session_id={session}&consistent_with={consistent_with}"),
        )
        .await
        .ok();
    let plans = stack
        .get(
            &owner,
            &format!("/plans?session_id={session}&consistent_with={consistent_with}"),
        )
        .await
        .ok();
    let fixtures: HashMap<String, Value> = [
        ("session_id", json!(session)),
        ("feature_id", json!(feature)),
        ("prompt_id", prompts["items"][0]["prompt_id"].clone()),
        ("plan_id", plans["items"][0]["plan_id"].clone()),
        ("consistent_with", json!(consistent_with)),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    assert!(fixtures.values().all(|v| !v.is_null()), "{fixtures:?}");

    let document = serde_json::to_value(canopy_query_api::openapi()).unwrap();
    let setup = Setup {
        tokens: HashMap::new(),
        default_token: owner,
        fixtures,
        // a WebSocket endpoint asked without a handshake says so
        also_valid: [("session_ws".to_owned(), vec![426])].into(),
    };
    let report = check(&document, &stack.query, &setup).await;
    assert!(
        report.failures.is_empty(),
        "{}\n{}",
        report.summary(),
        report.failures.join("\n")
    );
    assert!(report.requests > 300, "{}", report.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_and_the_docs_page_load_it() {
    let stack = Stack::start_with(false, 100).await;
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(format!("{}{path}", stack.query)).send();
    let served: Value = get("/openapi.json").await.unwrap().json().await.unwrap();
    assert_eq!(
        served,
        serde_json::to_value(canopy_query_api::openapi()).unwrap()
    );
    // No headless browser here: the test reads the page's initializer script, which is what
    // tells Swagger UI where the document is.
    let page = get("/docs/").await.unwrap().text().await.unwrap();
    let script = page
        .split("<script src=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .find(|src| src.contains("swagger-initializer"))
        .expect("the page loads an initializer script")
        .trim_start_matches("./")
        .to_owned();
    let initializer = get(&format!("/docs/{script}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        initializer.contains("\"url\": \"/openapi.json\"")
            || initializer.contains("\"url\":\"/openapi.json\""),
        "the initializer does not name /openapi.json:\n{initializer}"
    );
}
