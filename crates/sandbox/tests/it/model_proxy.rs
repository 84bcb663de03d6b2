//! The model proxy holds the provider's key for a hostile sandbox: it must reach nothing but the
//! endpoints OpenCode calls, with the methods it calls them with, never follow a redirect with
//! the key, and stop a sandbox at its token budget. The proxy here is the real one on a unix
//! socket; the provider is a local fake that records what reaches it (and, for the budget in a
//! real sandbox, the scripted model).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use canopy_opencode::{StopReason, TurnEnd};
use canopy_sandbox::{ModelProxy, ModelProxyLimits, ModelUpstream, ModelUsage, SandboxProvider};
use canopy_testkit::Script;
use serde_json::json;

use crate::support::{Harness, client, titled_session, turn};
use crate::upstream::{TOKENS_PER_CALL, Upstream, completions, raw_request};

const KEY: &str = "sk-proxy-test-key";

fn own_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

fn upstream_of(fake: &Upstream) -> ModelUpstream {
    ModelUpstream {
        base_url: fake.base_url(),
        api_key: KEY.to_owned(),
    }
}

#[tokio::test]
async fn encoded_dots_and_slashes_never_reach_the_upstream() {
    let fake = Upstream::start(completions).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = ModelProxy::start(
        &dir.path().join("model.sock"),
        own_uid(),
        upstream_of(&fake),
    )
    .unwrap();

    for target in [
        "/v1/%2e%2e/%2e%2e/secret",
        "/v1/%2E%2E/%2E%2E/admin/keys",
        "/v1/.%2e/.%2e/secret",
        "/v1/..%2f..%2fsecret",
        "/v1/chat%2fcompletions",
        "/v1/chat%2Fcompletions",
        "/v1/%5c..%5csecret",
        "/v1/%252e%252e/%252e%252e/secret",
        "/v1/../secret",
        "/v1/chat/completions/../../../secret",
        "/v1/./chat/completions",
        "/v1//chat/completions",
        "/v1/chat/completions/",
        "/secret",
        "//evil.example/v1/chat/completions",
    ] {
        let (status, answer) = raw_request(proxy.path(), "POST", target, "{}").await;
        assert!([403, 404].contains(&status), "{target}: {status} {answer}");
        assert!(
            !answer.contains("\"choices\""),
            "{target} was answered by the upstream: {answer}"
        );
    }
    assert!(
        fake.seen().is_empty(),
        "the upstream was reached: {:#?}",
        fake.seen()
    );
}

#[tokio::test]
async fn only_chat_completions_and_models_reach_the_upstream() {
    let fake = Upstream::start(completions).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = ModelProxy::start(
        &dir.path().join("model.sock"),
        own_uid(),
        upstream_of(&fake),
    )
    .unwrap();

    for (method, target) in [
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("GET", "/v1/files/file-1/content"),
        ("POST", "/v1/batches"),
        ("GET", "/v1/batches/batch_1"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/organization/admin_api_keys"),
        ("DELETE", "/v1/models/m"),
        ("POST", "/v1/models"),
        ("GET", "/v1/chat/completions"),
        ("PUT", "/v1/chat/completions"),
        ("DELETE", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/health"),
    ] {
        let (status, answer) = raw_request(proxy.path(), method, target, "{}").await;
        assert!(
            [403, 404, 405].contains(&status),
            "{method} {target}: {status} {answer}"
        );
    }
    assert!(
        fake.seen().is_empty(),
        "the upstream was reached: {:#?}",
        fake.seen()
    );

    let (status, answer) = raw_request(
        proxy.path(),
        "POST",
        "/v1/chat/completions",
        r#"{"model":"m","stream":false,"messages":[]}"#,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"choices\""), "{answer}");
    let (status, answer) = raw_request(proxy.path(), "GET", "/v1/models", "").await;
    assert_eq!(status, 200, "{answer}");

    let seen = fake.seen();
    let calls: Vec<(&str, &str)> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.target.as_str()))
        .collect();
    assert_eq!(
        calls,
        [("POST", "/v1/chat/completions"), ("GET", "/v1/models")]
    );
    for s in &seen {
        assert_eq!(s.authorization.as_deref(), Some(&*format!("Bearer {KEY}")));
    }
}

#[tokio::test]
async fn redirects_from_the_upstream_are_never_followed() {
    // Another server the redirect points at: it must never be reached, with or without the key.
    let elsewhere = Upstream::start(completions).await;
    let away = format!("http://{}/collect", elsewhere.addr);
    // 302 and 303 turn a POST into a GET without a body: a client can always follow them.
    let fake = Upstream::start(move |seen| {
        let (status, location) = if seen.target.starts_with("/v1/models") {
            (StatusCode::SEE_OTHER, away.clone())
        } else {
            // Same host and port: a client that follows it keeps the key.
            (StatusCode::FOUND, "/internal/keys".to_owned())
        };
        (status, [(header::LOCATION, location)]).into_response()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = ModelProxy::start(
        &dir.path().join("model.sock"),
        own_uid(),
        upstream_of(&fake),
    )
    .unwrap();

    let (status, answer) = raw_request(
        proxy.path(),
        "POST",
        "/v1/chat/completions",
        r#"{"model":"m","stream":true,"messages":[]}"#,
    )
    .await;
    assert!(
        status == 502 || (300..400).contains(&status),
        "{status} {answer}"
    );
    let (status, answer) = raw_request(proxy.path(), "GET", "/v1/models", "").await;
    assert!(
        status == 502 || (300..400).contains(&status),
        "{status} {answer}"
    );

    let targets: Vec<String> = fake.seen().iter().map(|s| s.target.clone()).collect();
    assert_eq!(
        targets,
        ["/v1/chat/completions", "/v1/models"],
        "the proxy followed a redirect"
    );
    assert!(
        elsewhere.seen().is_empty(),
        "the redirect target was reached: {:#?}",
        elsewhere.seen()
    );
}

/// Waits until `usage` counted `tokens` (an answer is counted once the proxy is done with it).
async fn wait_tokens(usage: &ModelUsage, tokens: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while usage.tokens() != tokens && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(usage.tokens(), tokens);
}

#[tokio::test]
async fn calls_past_the_token_budget_get_429_without_reaching_the_upstream() {
    let fake = Upstream::start(completions).await;
    let dir = tempfile::tempdir().unwrap();
    let usage = Arc::new(ModelUsage::default());
    let limits = ModelProxyLimits {
        token_budget: Some(2 * TOKENS_PER_CALL - 20),
        ..ModelProxyLimits::default()
    };
    let proxy = ModelProxy::start_with(
        &dir.path().join("model.sock"),
        own_uid(),
        upstream_of(&fake),
        limits,
        usage.clone(),
    )
    .unwrap();

    // A whole JSON answer: its usage counts.
    let (status, answer) = raw_request(
        proxy.path(),
        "POST",
        "/v1/chat/completions",
        r#"{"model":"m","stream":false,"messages":[]}"#,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    wait_tokens(&usage, TOKENS_PER_CALL).await;

    // A stream that did not ask for usage: the proxy asks for it, and counts the usage chunk.
    let (status, answer) = raw_request(
        proxy.path(),
        "POST",
        "/v1/chat/completions",
        r#"{"model":"m","stream":true,"messages":[]}"#,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"usage\""), "{answer}");
    wait_tokens(&usage, 2 * TOKENS_PER_CALL).await;
    let seen = fake.seen();
    assert_eq!(
        seen[1].json()["stream_options"],
        json!({ "include_usage": true })
    );

    // Over the budget: refused here, with a clear error, and the upstream never hears of it.
    for (method, target, body) in [
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model":"m","stream":true}"#,
        ),
        ("GET", "/v1/models", ""),
    ] {
        let (status, answer) = raw_request(proxy.path(), method, target, body).await;
        assert_eq!(status, 429, "{answer}");
        assert!(answer.contains("token_budget_exhausted"), "{answer}");
        assert!(
            answer.contains("used 220 model tokens of its budget of 200"),
            "{answer}"
        );
    }
    assert_eq!(fake.seen().len(), 2, "{:#?}", fake.seen());
    assert_eq!(usage.calls(), 2);
    assert_eq!(usage.refused(), 2);
    assert!(
        usage
            .last_refusal()
            .unwrap()
            .contains("no further model calls")
    );
}

#[tokio::test]
async fn the_runner_s_ceiling_refuses_calls_once_reached_and_lifts_when_cleared() {
    let fake = Upstream::start(completions).await;
    let dir = tempfile::tempdir().unwrap();
    let usage = Arc::new(ModelUsage::default());
    let proxy = ModelProxy::start_with(
        &dir.path().join("model.sock"),
        own_uid(),
        upstream_of(&fake),
        ModelProxyLimits::default(),
        usage.clone(),
    )
    .unwrap();
    let call = || {
        raw_request(
            proxy.path(),
            "POST",
            "/v1/chat/completions",
            r#"{"model":"m","stream":false,"messages":[]}"#,
        )
    };
    // below the ceiling: the call goes through and its tokens count
    usage.set_ceiling(Some(TOKENS_PER_CALL));
    let (status, answer) = call().await;
    assert_eq!(status, 200, "{answer}");
    wait_tokens(&usage, TOKENS_PER_CALL).await;
    // at the ceiling: refused here, the upstream never hears of it
    let (status, answer) = call().await;
    assert_eq!(status, 429, "{answer}");
    assert!(answer.contains("budget_exhausted"), "{answer}");
    assert_eq!(fake.seen().len(), 1);
    // the runner lifts it (a budget was raised): calls go through again
    usage.set_ceiling(None);
    let (status, answer) = call().await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(fake.seen().len(), 2);
}

#[tokio::test]
async fn a_sandbox_past_its_budget_gets_the_refusal_in_its_turn_even_after_a_resume() {
    let h = Harness::start_adjusted(Script::new(), |config| {
        config.model_limits.token_budget = Some(1);
    })
    .await
    .unwrap();
    let spec = h.spec("budget");
    let info = h.provider.start(spec.clone()).await.unwrap();
    let opencode = client(&info).unwrap();
    let session = titled_session(&opencode).await.unwrap();

    // The first call is within the budget (nothing used yet); it spends it.
    let _ = turn(&opencode, &session, "Say hello.").await.unwrap();
    let usage = h.provider.model_usage("budget").await.unwrap();
    assert!(usage.tokens() >= 1, "{}", usage.tokens());

    // Stopped and resumed: a new proxy, the same budget.
    h.provider.stop("budget").await.unwrap();
    let info = h.provider.start(spec).await.unwrap();
    let opencode = client(&info).unwrap();
    let reached = h.model.requests().len();
    let outcome = turn(&opencode, &session, "Say hello again.").await.unwrap();

    let message = match &outcome.end {
        TurnEnd::Stopped(StopReason::ModelRetrying { message, .. }) => message.clone(),
        TurnEnd::Failed(error) => format!("{error:?}"),
        other => panic!("the turn should fail on the budget: {other:?}"),
    };
    assert!(message.contains("budget"), "{message}");
    assert_eq!(
        h.model.requests().len(),
        reached,
        "the upstream was reached"
    );
    assert!(usage.refused() >= 1);

    h.provider.remove("budget").await.unwrap();
}
