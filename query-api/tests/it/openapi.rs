//! The checked-in OpenAPI document equals what the code generates.

#[test]
fn checked_in_openapi_document_is_current() {
    let generated = serde_json::to_string_pretty(&canopy_query_api::openapi()).unwrap() + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/query-api.json");
    if std::env::var("CANOPY_UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "openapi/query-api.json is stale: run `CANOPY_UPDATE_OPENAPI=1 cargo test -p canopy-query-api openapi` and commit it"
    );
}
