//! Budget commands: owners and admins set and clear what their workspace's agents may spend
//! (`docs/budgets.md`). Everyone in the workspace reads them through query-api.

use axum::extract::State;
use axum::response::Response;
use canopy_domain::{Budget, BudgetCommand, budget_id};

use crate::AppState;
use crate::commands::{Effect, run};
use crate::dto::{ClearBudget, SetBudget};
use crate::error::ApiError;
use crate::extract::{CommandHeaders, CommandRequest};
use crate::routes::Changed;

/// Set (or replace) a budget of the caller's workspace. Owners and admins only (403 otherwise).
///
/// The workspace's budget stream is derived from the workspace; setting the limit it already
/// has appends nothing.
#[utoipa::path(post, path = "/budgets", params(CommandHeaders), tag = "budgets", request_body = SetBudget,
    responses(Changed), security(("bearer" = [])))]
pub(crate) async fn set_budget(
    State(state): State<AppState>,
    request: CommandRequest<SetBudget>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    let workspace_id = ctx.caller.claims.workspace_id.clone().unwrap_or_default();
    let command = BudgetCommand::SetBudget {
        actor: ctx.caller.actor(),
        workspace_id: workspace_id.clone(),
        kind: body.kind.into(),
        limit: body.limit,
    };
    let id = budget_id(&workspace_id).to_string();
    run::<Budget>(&state, ctx, &id, command, &(), Effect::Changes).await
}

/// Remove a budget of the caller's workspace (a no-op when it has none). Owners and admins only.
#[utoipa::path(post, path = "/budgets/clear", params(CommandHeaders), tag = "budgets", request_body = ClearBudget,
    responses(Changed), security(("bearer" = [])))]
pub(crate) async fn clear_budget(
    State(state): State<AppState>,
    request: CommandRequest<ClearBudget>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    let workspace_id = ctx.caller.claims.workspace_id.clone().unwrap_or_default();
    let command = BudgetCommand::ClearBudget {
        actor: ctx.caller.actor(),
        workspace_id: workspace_id.clone(),
        kind: body.kind.into(),
    };
    let id = budget_id(&workspace_id).to_string();
    run::<Budget>(&state, ctx, &id, command, &(), Effect::Changes).await
}
