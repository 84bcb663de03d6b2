//! The endpoints, grouped by who calls them: people's session commands, the runner's reports,
//! feature commands, and operations (health, readiness, metrics).

pub(crate) mod features;
pub(crate) mod ops;
pub(crate) mod runner;
pub(crate) mod sessions;

use std::collections::BTreeMap;

use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, response::Response};

/// The answers every command endpoint documents, besides its success.
fn problem_responses(map: &mut BTreeMap<String, RefOr<Response>>) {
    for (status, description) in [
        (
            "400",
            "Malformed JSON, invalid header or missing Idempotency-Key (runner)",
        ),
        ("401", "Missing or invalid bearer token"),
        ("403", "The caller's role may not do this"),
        (
            "404",
            "No such session or feature in the caller's workspace",
        ),
        (
            "409",
            "Refused in the current state, version mismatch, concurrent change or key in flight (see Retry-After)",
        ),
        (
            "413",
            "Body over the size limit, or prompt text over its limit",
        ),
        ("415", "The body is not JSON"),
        (
            "422",
            "Invalid fields (listed), invalid command, or an Idempotency-Key reused with another request",
        ),
        ("429", "Rate limited (see Retry-After)"),
        ("500", "Internal error (the body carries only a request id)"),
    ] {
        map.insert(status.to_owned(), problem(description));
    }
}

fn problem(description: &str) -> RefOr<Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build(),
    )
}

fn accepted(description: &str) -> RefOr<Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("CommandAccepted")))
                    .build(),
            )
            .build(),
    )
}

/// Responses of a command that creates something.
pub(crate) struct Created;

impl utoipa::IntoResponses for Created {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut map = BTreeMap::new();
        map.insert(
            "201".to_owned(),
            accepted("Created: the events were appended"),
        );
        problem_responses(&mut map);
        map
    }
}

/// Responses of a command that changes what exists.
pub(crate) struct Changed;

impl utoipa::IntoResponses for Changed {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut map = BTreeMap::new();
        map.insert(
            "202".to_owned(),
            accepted("Accepted: the events were appended (none if nothing changed)"),
        );
        problem_responses(&mut map);
        map
    }
}
