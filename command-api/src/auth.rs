//! Who is calling: the bearer JWT, verified, as the domain's [`Actor`].

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use canopy_auth::{Claims, Verifier};
use canopy_domain::{Actor, Role};
use canopy_event_store::{ActorKind, EventMetadata};

use crate::AppState;
use crate::error::ApiError;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub claims: Claims,
}

impl Caller {
    pub fn actor(&self) -> Actor {
        self.claims.actor()
    }

    pub fn is_runner(&self) -> bool {
        self.claims.role == Role::Runner
    }

    /// The scope of idempotency keys and rate limits: one per caller.
    pub fn scope(&self) -> String {
        match &self.claims.workspace_id {
            Some(workspace) => format!("user:{workspace}:{}", self.claims.sub),
            None => format!("service:{}", self.claims.sub),
        }
    }

    /// Event metadata for a command of this caller.
    pub fn metadata(&self) -> EventMetadata {
        let kind = if self.is_runner() {
            ActorKind::Service
        } else {
            ActorKind::User
        };
        EventMetadata::new(&self.claims.sub, &self.claims.name, kind)
    }
}

pub(crate) fn verify(verifier: &Verifier, parts: &Parts) -> Result<Caller, ApiError> {
    let header = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .ok_or(ApiError::Unauthorized)?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or(ApiError::Unauthorized)?;
    let claims = verifier.verify(token.trim()).map_err(|error| {
        tracing::debug!(%error, "token refused");
        ApiError::Unauthorized
    })?;
    Ok(Caller { claims })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        let caller = verify(&state.verifier, parts)?;
        parts.extensions.insert(caller.clone());
        Ok(caller)
    }
}
