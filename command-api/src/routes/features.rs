//! Feature commands: the shared context that sessions of one feature read.

use axum::extract::State;
use axum::response::Response;
use canopy_domain::{Actor, Feature, FeatureCommand};
use uuid::Uuid;

use crate::AppState;
use crate::commands::{Effect, Ids, check_session, run};
use crate::dto::{AttachSession, CreateFeature, Empty, RecordDecision, ShareLearning};
use crate::error::ApiError;
use crate::extract::{CommandContext, CommandHeaders, CommandRequest};
use crate::routes::{Changed, Created};

async fn feature(
    state: &AppState,
    ctx: CommandContext,
    feature_id: Uuid,
    effect: Effect,
    command: impl FnOnce(Actor) -> FeatureCommand,
) -> Result<Response, ApiError> {
    let command = command(ctx.caller.actor());
    run::<Feature>(state, ctx, &feature_id.to_string(), command, &(), effect).await
}

/// Create a feature in the caller's workspace.
#[utoipa::path(post, path = "/features", params(CommandHeaders), tag = "features", request_body = CreateFeature,
    responses(Created), security(("bearer" = [])))]
pub(crate) async fn create_feature(
    State(state): State<AppState>,
    request: CommandRequest<CreateFeature>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    let feature_id = Uuid::new_v4();
    let workspace_id = ctx.caller.claims.workspace_id.clone().unwrap_or_default();
    let effect = Effect::Creates(feature_id.to_string());
    feature(&state, ctx, feature_id, effect, |actor| {
        FeatureCommand::CreateFeature {
            actor,
            feature_id,
            workspace_id,
            title: body.title,
            description: body.description,
        }
    })
    .await
}

/// Attach a session of the same workspace to the feature.
#[utoipa::path(post, path = "/features/{feature_id}/sessions", tag = "features",
    params(("feature_id" = Uuid, Path, description = "The feature's id"), CommandHeaders), request_body = AttachSession,
    responses(Changed), security(("bearer" = [])))]
pub(crate) async fn attach_session(
    State(state): State<AppState>,
    Ids(feature_id): Ids<Uuid>,
    request: CommandRequest<AttachSession>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    check_session(&state, &ctx.caller, body.session_id).await?;
    feature(&state, ctx, feature_id, Effect::Changes, |actor| {
        FeatureCommand::AttachSession {
            actor,
            session_id: body.session_id,
        }
    })
    .await
}

/// Share something learned with every session of the feature.
#[utoipa::path(post, path = "/features/{feature_id}/learnings", tag = "features",
    params(("feature_id" = Uuid, Path, description = "The feature's id"), CommandHeaders), request_body = ShareLearning,
    responses(Created), security(("bearer" = [])))]
pub(crate) async fn share_learning(
    State(state): State<AppState>,
    Ids(feature_id): Ids<Uuid>,
    request: CommandRequest<ShareLearning>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    let learning_id = Uuid::new_v4();
    let effect = Effect::Creates(learning_id.to_string());
    feature(&state, ctx, feature_id, effect, |actor| {
        FeatureCommand::ShareLearning {
            actor,
            learning_id,
            session_id: body.session_id,
            text: body.text,
        }
    })
    .await
}

/// Record a decision taken for the feature.
#[utoipa::path(post, path = "/features/{feature_id}/decisions", tag = "features",
    params(("feature_id" = Uuid, Path, description = "The feature's id"), CommandHeaders), request_body = RecordDecision,
    responses(Created), security(("bearer" = [])))]
pub(crate) async fn record_decision(
    State(state): State<AppState>,
    Ids(feature_id): Ids<Uuid>,
    request: CommandRequest<RecordDecision>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    let decision_id = Uuid::new_v4();
    let effect = Effect::Creates(decision_id.to_string());
    feature(&state, ctx, feature_id, effect, |actor| {
        FeatureCommand::RecordDecision {
            actor,
            decision_id,
            title: body.title,
            rationale: body.rationale,
        }
    })
    .await
}

/// Complete the feature (owners and admins); it accepts nothing afterwards.
#[utoipa::path(post, path = "/features/{feature_id}/complete", tag = "features",
    params(("feature_id" = Uuid, Path, description = "The feature's id"), CommandHeaders), request_body(content = Option<Empty>),
    responses(Changed), security(("bearer" = [])))]
pub(crate) async fn complete_feature(
    State(state): State<AppState>,
    Ids(feature_id): Ids<Uuid>,
    request: CommandRequest<Empty>,
) -> Result<Response, ApiError> {
    feature(&state, request.ctx, feature_id, Effect::Changes, |actor| {
        FeatureCommand::CompleteFeature { actor }
    })
    .await
}
