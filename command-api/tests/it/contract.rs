//! The OpenAPI document tells the truth: every operation, sent over a real socket requests that
//! keep each promise of the document and requests that break each constraint (lengths,
//! patterns, formats, enums, required fields and headers, unknown fields, types, bounds), bad
//! JSON, a null body, a body not declared as JSON, no or a bad token, a malformed path id and a
//! method the path does not have, answers with a documented status, media type and body
//! (`canopy_http::contract`).

use std::collections::HashMap;

use canopy_domain::Role;
use canopy_http::contract::{Setup, check};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{TestApp, runner, token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_its_document_says() {
    let app = TestApp::start_with(|config| {
        config.rate_limit_per_second = 100_000;
        config.rate_limit_burst = 100_000;
    })
    .await;
    let owner = token(Role::Owner, "owner");
    // real ids, so that valid requests reach the handlers (a running prompt, a pending plan, an
    // open tool request, a checkpoint, a feature)
    let (session, prompt, plan) = app.with_pending_plan(&owner).await;
    let request = app
        .runner(
            &format!("/runner/sessions/{session}/tool-approvals"),
            json!({"prompt_id": prompt, "call_id": "call_1", "tool": "bash", "input_summary": "ls"}),
        )
        .await
        .expect(201)
        .id();
    let checkpoint = app
        .runner(
            &format!("/runner/sessions/{session}/checkpoints"),
            json!({"commit_sha": "0123456789abcdef", "files_changed": ["a.rs"], "trigger": "manual"}),
        )
        .await
        .expect(201)
        .id();
    let feature = app
        .post(&owner, "/features", json!({"title": "Login"}))
        .await
        .expect(201)
        .id();

    // webhooks: one to change, one of its own to delete (a literal public address: no DNS)
    let mut webhooks = Vec::new();
    for _ in 0..2 {
        let webhook = app
            .post(
                &owner,
                "/webhooks",
                json!({"url": "https://203.0.113.10/hooks", "event_types": ["PlanProposed"]}),
            )
            .await
            .expect(201)
            .id();
        webhooks.push(webhook);
    }

    let document = serde_json::to_value(canopy_command_api::openapi()).unwrap();
    let mut fixtures: HashMap<String, Value> = [
        ("session_id", session),
        ("prompt_id", prompt),
        ("plan_id", plan),
        ("request_id", request),
        ("checkpoint_id", checkpoint),
        ("feature_id", feature),
        ("webhook_id", webhooks[0]),
    ]
    .into_iter()
    .map(|(name, id)| (name.to_owned(), json!(id)))
    .collect();
    // commands that end a session get sessions of their own, so that the others still run
    fixtures.insert("delete_webhook.webhook_id".to_owned(), json!(webhooks[1]));
    for ending in ["archive_session", "complete_session", "session_failed"] {
        let own = app.start_session(&owner).await;
        fixtures.insert(format!("{ending}.session_id"), json!(own));
    }
    // the ids a command creates are new ones
    for created in [
        "start_session.session_id",
        "submit_prompt.prompt_id",
        "plan_proposed.plan_id",
        "tool_approval_requested.request_id",
        "checkpoint_taken.checkpoint_id",
        "create_feature.feature_id",
    ] {
        fixtures.insert(created.to_owned(), json!(Uuid::new_v4()));
    }
    let runner_operations = document["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(path, _)| path.starts_with("/runner/"))
        .filter_map(|(_, item)| item["post"]["operationId"].as_str())
        .map(|id| (id.to_owned(), runner()))
        .collect();
    let setup = Setup {
        tokens: runner_operations,
        default_token: owner,
        fixtures,
        also_valid: HashMap::new(),
    };
    let report = check(&document, &app.base, &setup).await;
    assert!(
        report.failures.is_empty(),
        "{}\n{}",
        report.summary(),
        report.failures.join("\n")
    );
    assert!(report.requests > 500, "{}", report.summary());
}
