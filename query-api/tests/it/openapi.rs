//! The checked-in OpenAPI document equals what the code generates; every reference in it is
//! defined and every error answer is problem+json.

#[test]
fn checked_in_openapi_document_is_current() {
    canopy_http::contract::assert_checked_in(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/query-api.json"),
        &canopy_query_api::openapi(),
        "cargo test -p canopy-query-api openapi",
    );
}

#[test]
fn every_referenced_schema_is_defined() {
    let doc = serde_json::to_value(canopy_query_api::openapi()).unwrap();
    canopy_http::contract::assert_every_reference_defined(&doc);
}

/// Every answer is described, and every error answer is documented as problem+json.
#[test]
fn every_answer_is_described_and_every_error_is_problem_json() {
    let doc = serde_json::to_value(canopy_query_api::openapi()).unwrap();
    canopy_http::contract::assert_every_answer_described_and_errors_problem_json(&doc);
}
