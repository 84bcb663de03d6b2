//! The checked-in OpenAPI document equals what the code generates; the served one too.

use crate::support::TestApp;

#[test]
fn checked_in_openapi_document_is_current() {
    canopy_http::contract::assert_checked_in(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/command-api.json"),
        &canopy_command_api::openapi(),
        "cargo test -p canopy-command-api openapi",
    );
}

#[test]
fn every_command_route_is_documented_with_its_errors() {
    let doc = serde_json::to_value(canopy_command_api::openapi()).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 36, "only {} paths documented", paths.len());
    for (path, item) in paths {
        if let Some(post) = item.get("post") {
            let responses = post["responses"].as_object().unwrap();
            for status in ["401", "403", "422", "429"] {
                assert!(
                    responses.contains_key(status),
                    "{path} does not document {status}"
                );
            }
            assert!(
                post.get("security").is_some(),
                "{path} does not require a token"
            );
        }
    }
}

#[tokio::test]
async fn the_served_document_and_docs_page_are_there() {
    let app = TestApp::start().await;
    let served = app
        .raw(app.request(reqwest::Method::GET, "/openapi.json"))
        .await
        .expect(200);
    assert_eq!(
        served.body,
        serde_json::to_value(canopy_command_api::openapi()).unwrap()
    );
    let docs = app
        .raw(app.request(reqwest::Method::GET, "/docs/"))
        .await
        .expect(200);
    assert!(
        docs.body.as_str().unwrap().contains("swagger"),
        "no Swagger UI page"
    );
}

/// The docs page loads this API's own document. (No headless browser here: the test reads the
/// page's initializer script, which is what tells Swagger UI where the document is.)
#[tokio::test]
async fn the_docs_page_loads_the_served_document() {
    let app = TestApp::start().await;
    let page = app
        .raw(app.request(reqwest::Method::GET, "/docs/"))
        .await
        .expect(200);
    let page = page.body.as_str().unwrap();
    let script = page
        .split("<script src=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .find(|src| src.contains("swagger-initializer"))
        .expect("the page loads an initializer script");
    let script = script.trim_start_matches("./");
    let initializer = app
        .raw(app.request(reqwest::Method::GET, &format!("/docs/{script}")))
        .await
        .expect(200);
    let initializer = initializer.body.as_str().unwrap();
    assert!(
        initializer.contains("\"url\": \"/openapi.json\"")
            || initializer.contains("\"url\":\"/openapi.json\""),
        "the initializer does not name /openapi.json:\n{initializer}"
    );
    app.raw(app.request(reqwest::Method::GET, "/openapi.json"))
        .await
        .expect(200);
}

#[test]
fn every_referenced_schema_is_defined() {
    let doc = serde_json::to_value(canopy_command_api::openapi()).unwrap();
    canopy_http::contract::assert_every_reference_defined(&doc);
}

/// Every answer is described, and every error answer is documented as problem+json.
#[test]
fn every_answer_is_described_and_every_error_is_problem_json() {
    let doc = serde_json::to_value(canopy_command_api::openapi()).unwrap();
    canopy_http::contract::assert_every_answer_described_and_errors_problem_json(&doc);
}
