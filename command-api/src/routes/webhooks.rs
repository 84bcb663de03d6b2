//! Webhook subscriptions, for owners and admins: create (the target passes the SSRF check, the
//! server generates the signing secret), pause, resume, rotate the secret, delete, and deliver
//! an event again. The secret is shown once, in the answer that creates or rotates it; it is
//! written to `webhook_secrets` in the append's transaction (a [`Fence`]), never into an event.

use axum::extract::State;
use axum::response::Response;
use canopy_domain::{Actor, DomainError, Webhook, WebhookCommand};
use canopy_event_store::{Committed, Fence, PgConnection};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;
use crate::commands::{Admit, Effect, Extra, Ids, NoFence, run_with};
use crate::dto::{CreateWebhook, Empty};
use crate::error::ApiError;
use crate::extract::{CommandContext, CommandHeaders, CommandRequest};
use crate::routes::{Changed, Created, SecretChanged};

/// Stores the secret under the version the appended event names, in the append's transaction.
#[derive(Debug)]
struct StoreSecret<'a> {
    webhook_id: Uuid,
    secret: &'a str,
}

impl Admit for StoreSecret<'_> {}

impl Fence for StoreSecret<'_> {
    async fn check(
        &self,
        conn: &mut PgConnection,
        committed: &Committed,
    ) -> Result<bool, sqlx::Error> {
        for event in &committed.events {
            if !matches!(
                event.event_type.as_str(),
                "WebhookSubscribed" | "WebhookSecretRotated"
            ) {
                continue;
            }
            sqlx::query(
                "INSERT INTO webhook_secrets (webhook_id, version, secret)
                 SELECT $1, (payload -> event_type ->> 'secret_version')::bigint, $2
                   FROM events WHERE event_id = $3",
            )
            .bind(self.webhook_id)
            .bind(self.secret)
            .bind(event.event_id)
            .execute(&mut *conn)
            .await?;
        }
        Ok(true)
    }
}

/// Forgets a deleted subscription's secrets with its deletion.
#[derive(Debug)]
struct ForgetSecrets {
    webhook_id: Uuid,
}

impl Admit for ForgetSecrets {}

impl Fence for ForgetSecrets {
    async fn check(
        &self,
        conn: &mut PgConnection,
        committed: &Committed,
    ) -> Result<bool, sqlx::Error> {
        if committed
            .events
            .iter()
            .any(|event| event.event_type == "WebhookDeleted")
        {
            sqlx::query("DELETE FROM webhook_secrets WHERE webhook_id = $1")
                .bind(self.webhook_id)
                .execute(&mut *conn)
                .await?;
        }
        Ok(true)
    }
}

async fn webhook<F: Admit>(
    state: &AppState,
    ctx: CommandContext,
    webhook_id: Uuid,
    effect: Effect,
    extra: Option<Extra<'_, F>>,
    command: impl FnOnce(Actor) -> WebhookCommand,
) -> Result<Response, ApiError> {
    let command = command(ctx.caller.actor());
    run_with::<Webhook, F>(
        state,
        ctx,
        &webhook_id.to_string(),
        command,
        &(),
        effect,
        extra,
    )
    .await
}

/// Refuses people who may not manage webhooks before anything is resolved or looked up.
fn owners_and_admins(caller: &Caller) -> Result<(), ApiError> {
    if caller.claims.role.can_moderate() {
        Ok(())
    } else {
        Err(ApiError::Domain(DomainError::Forbidden))
    }
}

/// Subscribe an endpoint to event types of the caller's workspace (owners and admins). The
/// answer carries the signing secret, shown this once.
#[utoipa::path(post, path = "/webhooks", params(CommandHeaders), tag = "webhooks", request_body = CreateWebhook,
    responses(Created), security(("bearer" = [])))]
pub(crate) async fn create_webhook(
    State(state): State<AppState>,
    request: CommandRequest<CreateWebhook>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    owners_and_admins(&ctx.caller)?;
    canopy_webhook::check_target(&body.url, state.webhook_targets, state.resolver.as_ref())
        .await
        .map_err(ApiError::Target)?;
    let webhook_id = Uuid::new_v4();
    let workspace_id = ctx.caller.claims.workspace_id.clone().unwrap_or_default();
    let secret = canopy_webhook::generate_secret();
    let fence = StoreSecret {
        webhook_id,
        secret: &secret,
    };
    let extra = Extra {
        fence: &fence,
        secret: Some(secret.clone()),
    };
    let effect = Effect::Creates(webhook_id.to_string());
    webhook(&state, ctx, webhook_id, effect, Some(extra), |actor| {
        WebhookCommand::Subscribe {
            actor,
            webhook_id,
            workspace_id,
            url: body.url,
            event_types: body.event_types,
            description: body.description,
            secret_fingerprint: canopy_webhook::fingerprint(&secret),
        }
    })
    .await
}

/// Pause deliveries to the endpoint (events are still queued for it).
#[utoipa::path(post, path = "/webhooks/{webhook_id}/pause", tag = "webhooks",
    params(("webhook_id" = Uuid, Path, description = "The subscription's id"), CommandHeaders),
    request_body(content = Option<Empty>), responses(Changed), security(("bearer" = [])))]
pub(crate) async fn pause_webhook(
    State(state): State<AppState>,
    Ids(webhook_id): Ids<Uuid>,
    request: CommandRequest<Empty>,
) -> Result<Response, ApiError> {
    webhook::<NoFence>(
        &state,
        request.ctx,
        webhook_id,
        Effect::Changes,
        None,
        |actor| WebhookCommand::Pause { actor },
    )
    .await
}

/// Resume deliveries, also after the delivery service paused a failing endpoint on its own.
#[utoipa::path(post, path = "/webhooks/{webhook_id}/resume", tag = "webhooks",
    params(("webhook_id" = Uuid, Path, description = "The subscription's id"), CommandHeaders),
    request_body(content = Option<Empty>), responses(Changed), security(("bearer" = [])))]
pub(crate) async fn resume_webhook(
    State(state): State<AppState>,
    Ids(webhook_id): Ids<Uuid>,
    request: CommandRequest<Empty>,
) -> Result<Response, ApiError> {
    webhook::<NoFence>(
        &state,
        request.ctx,
        webhook_id,
        Effect::Changes,
        None,
        |actor| WebhookCommand::Resume { actor },
    )
    .await
}

/// Replace the signing secret; the previous one still signs (a second signature) for the
/// delivery service's grace period. The answer carries the new secret, shown this once.
#[utoipa::path(post, path = "/webhooks/{webhook_id}/rotate-secret", tag = "webhooks",
    params(("webhook_id" = Uuid, Path, description = "The subscription's id"), CommandHeaders),
    request_body(content = Option<Empty>), responses(SecretChanged), security(("bearer" = [])))]
pub(crate) async fn rotate_webhook_secret(
    State(state): State<AppState>,
    Ids(webhook_id): Ids<Uuid>,
    request: CommandRequest<Empty>,
) -> Result<Response, ApiError> {
    let secret = canopy_webhook::generate_secret();
    let fence = StoreSecret {
        webhook_id,
        secret: &secret,
    };
    let extra = Extra {
        fence: &fence,
        secret: Some(secret.clone()),
    };
    let fingerprint = canopy_webhook::fingerprint(&secret);
    webhook(
        &state,
        request.ctx,
        webhook_id,
        Effect::Changes,
        Some(extra),
        |actor| WebhookCommand::RotateSecret {
            actor,
            secret_fingerprint: fingerprint,
        },
    )
    .await
}

/// Delete the subscription: nothing more is delivered and its secrets are forgotten.
#[utoipa::path(post, path = "/webhooks/{webhook_id}/delete", tag = "webhooks",
    params(("webhook_id" = Uuid, Path, description = "The subscription's id"), CommandHeaders),
    request_body(content = Option<Empty>), responses(Changed), security(("bearer" = [])))]
pub(crate) async fn delete_webhook(
    State(state): State<AppState>,
    Ids(webhook_id): Ids<Uuid>,
    request: CommandRequest<Empty>,
) -> Result<Response, ApiError> {
    let fence = ForgetSecrets { webhook_id };
    let extra = Extra {
        fence: &fence,
        secret: None,
    };
    webhook(
        &state,
        request.ctx,
        webhook_id,
        Effect::Changes,
        Some(extra),
        |actor| WebhookCommand::Delete { actor },
    )
    .await
}

/// Deliver an event to the endpoint again: a new series of attempts with the same
/// `webhook-id`, in its place in the endpoint's order (the event must have been queued for this
/// subscription: see query-api's deliveries).
#[utoipa::path(post, path = "/webhooks/{webhook_id}/deliveries/{event_id}/redeliver", tag = "webhooks",
    params(("webhook_id" = Uuid, Path, description = "The subscription's id"), ("event_id" = Uuid, Path, description = "The delivered event's id"), CommandHeaders),
    request_body(content = Option<Empty>), responses(Changed), security(("bearer" = [])))]
pub(crate) async fn redeliver(
    State(state): State<AppState>,
    Ids((webhook_id, event_id)): Ids<(Uuid, Uuid)>,
    request: CommandRequest<Empty>,
) -> Result<Response, ApiError> {
    owners_and_admins(&request.ctx.caller)?;
    let queued: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM webhook_deliveries
          WHERE webhook_id = $1 AND event_id = $2 AND workspace_id = $3",
    )
    .bind(webhook_id)
    .bind(event_id)
    .bind(request.ctx.caller.claims.workspace_id.as_deref())
    .fetch_optional(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    if queued.is_none() {
        return Err(ApiError::Domain(DomainError::NotFound));
    }
    webhook::<NoFence>(
        &state,
        request.ctx,
        webhook_id,
        Effect::Changes,
        None,
        |actor| WebhookCommand::RequestRedelivery { actor, event_id },
    )
    .await
}
