//! Who may manage subscriptions, and the SSRF check at creation and again at delivery.

use canopy_domain::Role;
use serde_json::json;

use crate::support::{Receiver, Stack, token, token_in};

#[tokio::test]
async fn private_and_loopback_targets_are_refused_at_creation_and_at_delivery() {
    let mut stack = Stack::start(false).await;
    let owner = token(Role::Owner, "olive");
    stack.resolver.answer("internal.test", "10.1.2.3");
    stack.resolver.answer("metadata.test", "169.254.169.254");
    let before = stack.event_count().await;
    for (url, code) in [
        ("https://127.0.0.1:8443/hook", "webhook_target_not_public"),
        ("https://[::1]/hook", "webhook_target_not_public"),
        ("https://internal.test/hook", "webhook_target_not_public"),
        ("https://metadata.test/latest", "webhook_target_not_public"),
        ("https://nowhere.test/hook", "webhook_target_unresolvable"),
        ("http://hooks.example/hook", "webhook_url_insecure"),
        ("https://user:pw@hooks.example/", "webhook_url_invalid"),
    ] {
        let (status, body) = stack
            .post(
                &owner,
                "/webhooks",
                json!({"url": url, "event_types": ["PlanProposed"]}),
            )
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (422, Some(code)),
            "{url}: {body}"
        );
    }
    assert_eq!(
        stack.event_count().await,
        before,
        "a refusal writes nothing"
    );

    // public at creation, loopback at delivery (DNS changed in between): never reached
    let receiver = Receiver::start(&[]).await;
    stack.resolver.answer("hooks.test", "93.184.216.34");
    let url = format!("https://hooks.test:{}/hook", receiver.addr.port());
    let (webhook, _) = stack.subscribe(&url, &["PlanProposed"]).await;
    stack.resolver.answer("hooks.test", "127.0.0.1");
    stack.start_webhooks(false, |_| {}).await;
    stack.propose_plan().await;
    stack
        .until(
            "the refused attempts are logged",
            &format!(
                "SELECT count(*) >= 2 FROM webhook_attempts WHERE webhook_id = '{webhook}'
                   AND error LIKE 'target refused:%not a public address%' AND status_code IS NULL"
            ),
        )
        .await;
    assert!(
        receiver.received().is_empty(),
        "a refused target got a request"
    );
}

#[tokio::test]
async fn only_owners_and_admins_manage_webhooks_and_another_workspace_sees_none() {
    let stack = Stack::start(true).await;
    let receiver = Receiver::start(&[]).await;
    let body = json!({"url": receiver.url(), "event_types": ["PlanProposed"]});
    for role in [Role::Member, Role::Viewer, Role::Auditor] {
        let (status, answer) = stack
            .post(&token(role, "m"), "/webhooks", body.clone())
            .await;
        assert_eq!((status, answer["code"].as_str()), (403, Some("forbidden")));
    }
    let (status, answer) = stack
        .post(
            &token(Role::Admin, "ada"),
            "/webhooks",
            json!({"url": receiver.url(), "event_types": ["NoSuchEvent"]}),
        )
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (422, Some("unknown_event_type"))
    );
    let (status, answer) = stack
        .post(
            &token(Role::Admin, "ada"),
            "/webhooks",
            json!({"url": receiver.url(), "event_types": []}),
        )
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (422, Some("validation_failed"))
    );

    let (webhook, secret) = stack.subscribe(&receiver.url(), &["PlanProposed"]).await;
    assert!(secret.starts_with("whsec_"));
    let stranger = token_in(Role::Owner, "oscar", "w2");
    for action in ["pause", "resume", "rotate-secret", "delete"] {
        let (status, _) = stack
            .post(
                &stranger,
                &format!("/webhooks/{webhook}/{action}"),
                json!({}),
            )
            .await;
        assert_eq!(status, 404, "{action} from another workspace");
    }
    let (status, _) = stack
        .post(
            &token(Role::Member, "m"),
            &format!("/webhooks/{webhook}/pause"),
            json!({}),
        )
        .await;
    assert_eq!(status, 403);

    // rotation: a new secret, stored under version 2; the old one is kept for the grace period
    let owner = token(Role::Owner, "olive");
    let (status, answer) = stack
        .post(
            &owner,
            &format!("/webhooks/{webhook}/rotate-secret"),
            json!({}),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    let rotated = answer["secret"].as_str().unwrap();
    assert_ne!(rotated, secret);
    let stored: Vec<(i64, String)> = sqlx::query_as(
        "SELECT version, secret FROM webhook_secrets WHERE webhook_id = $1 ORDER BY version",
    )
    .bind(webhook)
    .fetch_all(stack.db.pool())
    .await
    .unwrap();
    assert_eq!(stored, vec![(1, secret.clone()), (2, rotated.to_owned())]);
    let fingerprint: String = sqlx::query_scalar(
        "SELECT payload -> 'WebhookSecretRotated' ->> 'secret_fingerprint' FROM events
          WHERE aggregate_id = $1 AND event_type = 'WebhookSecretRotated'",
    )
    .bind(webhook.to_string())
    .fetch_one(stack.db.pool())
    .await
    .unwrap();
    assert_eq!(fingerprint, canopy_webhook::fingerprint(rotated));

    // deletion forgets the secrets; the subscription is then absent
    let (status, _) = stack
        .post(&owner, &format!("/webhooks/{webhook}/delete"), json!({}))
        .await;
    assert_eq!(status, 202);
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_secrets WHERE webhook_id = $1")
            .bind(webhook)
            .fetch_one(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(left, 0);
    let (status, _) = stack
        .post(&owner, &format!("/webhooks/{webhook}/pause"), json!({}))
        .await;
    assert_eq!(status, 404);
}
