//! Who is reading: the bearer JWT of command-api's scheme, and the role table's read column.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use crate::AppState;
use crate::error::ApiError;

/// An authenticated person allowed to read, and their workspace.
#[derive(Debug, Clone)]
pub(crate) struct Reader {
    pub workspace_id: String,
    /// The token's subject: whose share of waits a read takes.
    pub person: String,
}

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(reader) = parts.extensions.get::<Reader>() {
            return Ok(reader.clone());
        }
        let claims = bearer_claims(parts, state)?;
        // Viewers, auditors, members, admins and owners read; the runner service does not.
        if !claims.role.can_read() {
            return Err(ApiError::Forbidden);
        }
        let workspace_id = claims.workspace_id.clone().ok_or(ApiError::Forbidden)?;
        let reader = Reader {
            workspace_id,
            person: claims.sub,
        };
        parts.extensions.insert(reader.clone());
        Ok(reader)
    }
}

/// An authenticated person whose role may audit (owner, admin, auditor), and their workspace.
#[derive(Debug, Clone)]
pub(crate) struct Auditor {
    pub workspace_id: String,
}

impl FromRequestParts<AppState> for Auditor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let claims = bearer_claims(parts, state)?;
        if !claims.role.can_audit() {
            return Err(ApiError::Forbidden);
        }
        let workspace_id = claims.workspace_id.clone().ok_or(ApiError::Forbidden)?;
        Ok(Auditor { workspace_id })
    }
}

/// An authenticated owner or admin (who manage the workspace's webhooks), and their workspace.
#[derive(Debug, Clone)]
pub(crate) struct Manager {
    pub workspace_id: String,
}

impl FromRequestParts<AppState> for Manager {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let claims = bearer_claims(parts, state)?;
        if !claims.role.can_moderate() {
            return Err(ApiError::Forbidden);
        }
        let workspace_id = claims.workspace_id.clone().ok_or(ApiError::Forbidden)?;
        Ok(Manager { workspace_id })
    }
}

/// The verified claims of the request's bearer token (a stream ticket is refused by the
/// verifier).
fn bearer_claims(parts: &Parts, state: &AppState) -> Result<canopy_auth::Claims, ApiError> {
    let token = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or(ApiError::Unauthorized)?;
    state
        .verifier
        .verify(token.trim())
        .map_err(|_| ApiError::Unauthorized)
}
