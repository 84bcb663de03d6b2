//! The checked-in OpenAPI document equals what the code generates; the served one too.

use crate::support::TestApp;

#[test]
fn checked_in_openapi_document_is_current() {
    let generated = serde_json::to_string_pretty(&canopy_command_api::openapi()).unwrap() + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/command-api.json");
    if std::env::var("CANOPY_UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "openapi/command-api.json is stale: run `CANOPY_UPDATE_OPENAPI=1 cargo test -p canopy-command-api openapi` and commit it"
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
