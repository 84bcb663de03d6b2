//! The endpoints, grouped by who calls them: people's session commands, the runner's reports,
//! feature commands, and operations (health, readiness, metrics).

pub(crate) mod budgets;
pub(crate) mod features;
pub(crate) mod runner;
pub(crate) mod sessions;
pub(crate) mod webhooks;

use std::collections::BTreeMap;

use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, response::Response};

/// The answers every command endpoint documents, besides its success: each status with the
/// codes it carries.
fn problem_responses(map: &mut BTreeMap<String, RefOr<Response>>) {
    for (status, description, retry_after) in [
        (
            "400",
            "`malformed_json`: the body is not JSON; `invalid_header`: a header breaks its pattern; \
             `idempotency_key_required`: no Idempotency-Key on a runner route (or from the runner)",
            false,
        ),
        (
            "401",
            "`unauthorized`: missing or invalid bearer token",
            false,
        ),
        (
            "403",
            "`forbidden`: the caller's role may not do this",
            false,
        ),
        (
            "404",
            "`not_found` (or the rule's code): no such session, feature, prompt, plan, request or \
             checkpoint in the caller's workspace",
            false,
        ),
        (
            "409",
            "Refused in the current state (the rule's code), `version_mismatch`, \
             `concurrency_conflict` or `idempotency_key_in_flight` (these two with Retry-After)",
            true,
        ),
        (
            "413",
            "`payload_too_large`: the body is over the size limit; `prompt_too_large`: the prompt \
             text is",
            false,
        ),
        (
            "415",
            "`unsupported_media_type`: a body that is not declared as JSON",
            false,
        ),
        (
            "422",
            "`validation_failed`: fields or path ids that break their schema (each named in \
             `errors`); an invalid command (the rule's code, e.g. `unknown_event_type`); \
             `feature_not_found` or `session_not_found`; `idempotency_key_reused`; a webhook \
             target refused: `webhook_url_invalid`, `webhook_url_insecure`, \
             `webhook_target_not_public`, `webhook_target_unresolvable`",
            false,
        ),
        ("429", "`rate_limited` (see Retry-After)", true),
        (
            "500",
            "`internal`: internal error (the body carries only a request id)",
            false,
        ),
    ] {
        map.insert(
            status.to_owned(),
            canopy_http::problem_response(description, retry_after),
        );
    }
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
            accepted("Created: the events were appended; `id` is the new thing's id, chosen by the server (a client never names what it creates, so an id can be neither squatted nor probed; retry with the same `Idempotency-Key` to get the same answer)"),
        );
        problem_responses(&mut map);
        map
    }
}

/// Responses of submitting a prompt: those of [`Created`], and a full queue.
pub(crate) struct PromptCreated;

impl utoipa::IntoResponses for PromptCreated {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut map = Created::responses();
        map.insert(
            "429".to_owned(),
            canopy_http::problem_response(
                "`rate_limited`; `prompt_queue_full`: the session already holds \
                 `CANOPY_MAX_QUEUED_PROMPTS` queued prompts (see Retry-After)",
                true,
            ),
        );
        map.insert(
            "402".to_owned(),
            canopy_http::problem_response(
                "`budget_exhausted`: a budget the prompt would draw on (the workspace's month, \
                 the author's day or the session) has nothing left after what is spent and what \
                 admitted prompts reserve; the members `budget`, `scope`, `period`, `unit`, \
                 `limit`, `spent`, `reserved` and `remaining` say which and how it stands \
                 (docs/budgets.md). Nothing is written",
                false,
            ),
        );
        map
    }
}

/// Responses of a command that replaces a secret: 202 with the new secret in the answer.
pub(crate) struct SecretChanged;

impl utoipa::IntoResponses for SecretChanged {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut map = BTreeMap::new();
        map.insert(
            "202".to_owned(),
            accepted("Accepted: the events were appended; `secret` is the new signing secret, shown this once"),
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
