//! Bearer JWTs for Canopy: the claims both APIs accept, minting (for `canopy token` and tests)
//! and verification (HS256 with a shared secret, and RS256 with a public key when configured).
//!
//! A token names its subject (user id), display name, optional email (used for commit
//! authorship), workspace and role from the role table in `canopy_domain::Role`, or the service
//! role `runner`, which is not bound to one workspace.

use canopy_domain::{Actor, Role};
use chrono::Utc;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The HS256 secret used when none is configured: for development only. The services log a
/// warning when they run with it.
pub const DEV_SECRET: &str = "canopy-dev-secret-not-for-production";

/// Issuer written into and required from every token.
pub const ISSUER: &str = "canopy";

/// The claims of a Canopy token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id, or the service name for the runner.
    pub sub: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The one workspace a person belongs to; absent for the runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    pub role: Role,
    pub iss: String,
    pub iat: i64,
    pub exp: i64,
    /// Set on narrow tokens such as stream tickets ([`TICKET_PURPOSE`]); such a token is
    /// refused as a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
}

/// The purpose of a stream ticket: a short-lived token a browser's EventSource, which cannot
/// send headers, passes in the URL. Only the stream endpoints accept it.
pub const TICKET_PURPOSE: &str = "stream";

impl Claims {
    /// Claims for a person in a workspace, valid for `ttl`.
    pub fn user(
        sub: impl Into<String>,
        name: impl Into<String>,
        workspace_id: impl Into<String>,
        role: Role,
        ttl: chrono::Duration,
    ) -> Self {
        let now = Utc::now().timestamp();
        Self {
            sub: sub.into(),
            name: name.into(),
            email: None,
            workspace_id: Some(workspace_id.into()),
            role,
            iss: ISSUER.to_owned(),
            iat: now,
            exp: now + ttl.num_seconds(),
            purpose: None,
        }
    }

    /// A stream ticket for the same person, valid for `ttl`.
    pub fn ticket(&self, ttl: chrono::Duration) -> Self {
        let now = Utc::now().timestamp();
        Self {
            iat: now,
            exp: now + ttl.num_seconds(),
            purpose: Some(TICKET_PURPOSE.to_owned()),
            ..self.clone()
        }
    }

    /// Claims for the agent runner service, valid for `ttl`.
    pub fn runner(name: impl Into<String>, ttl: chrono::Duration) -> Self {
        let name = name.into();
        let now = Utc::now().timestamp();
        Self {
            sub: name.clone(),
            name,
            email: None,
            workspace_id: None,
            role: Role::Runner,
            iss: ISSUER.to_owned(),
            iat: now,
            exp: now + ttl.num_seconds(),
            purpose: None,
        }
    }

    /// The domain's view of the caller.
    pub fn actor(&self) -> Actor {
        Actor {
            id: self.sub.clone(),
            name: self.name.clone(),
            role: self.role,
            workspace_id: self.workspace_id.clone(),
            email: self.email.clone(),
        }
    }

    fn check(&self) -> Result<(), AuthError> {
        if self.sub.trim().is_empty() || self.name.trim().is_empty() {
            return Err(AuthError::InvalidClaims("sub and name must not be empty"));
        }
        match (self.role, &self.workspace_id) {
            (Role::Runner, Some(_)) => Err(AuthError::InvalidClaims(
                "the runner role is not bound to a workspace",
            )),
            (Role::Runner, None) => Ok(()),
            (_, None) => Err(AuthError::InvalidClaims(
                "a person's token names a workspace",
            )),
            (_, Some(workspace)) if workspace.trim().is_empty() => {
                Err(AuthError::InvalidClaims("workspace_id must not be empty"))
            }
            (_, Some(_)) => Ok(()),
        }
    }
}

/// Why a token was not accepted or could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid token: {0}")]
    InvalidToken(#[from] jsonwebtoken::errors::Error),
    #[error("invalid claims: {0}")]
    InvalidClaims(&'static str),
    #[error("invalid key: {0}")]
    InvalidKey(String),
}

/// Key material for verification.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Shared HS256 secret.
    pub hs256_secret: String,
    /// Optional RS256 public key (PEM); tokens signed with RS256 are accepted when set.
    pub rs256_public_key_pem: Option<String>,
    /// Clock skew tolerated on `exp`, in seconds.
    pub leeway_secs: u64,
}

/// Verifies bearer tokens.
#[derive(Clone)]
pub struct Verifier {
    hs256: DecodingKey,
    rs256: Option<DecodingKey>,
    leeway_secs: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("rs256", &self.rs256.is_some())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        if config.hs256_secret.len() < 16 {
            return Err(AuthError::InvalidKey(
                "the HS256 secret must be at least 16 bytes".to_owned(),
            ));
        }
        let rs256 = config
            .rs256_public_key_pem
            .as_deref()
            .map(|pem| {
                DecodingKey::from_rsa_pem(pem.as_bytes())
                    .map_err(|e| AuthError::InvalidKey(e.to_string()))
            })
            .transpose()?;
        Ok(Self {
            hs256: DecodingKey::from_secret(config.hs256_secret.as_bytes()),
            rs256,
            leeway_secs: config.leeway_secs,
        })
    }

    /// Checks a bearer token: signature, issuer, expiry, the claims' own consistency, and that it
    /// is not a narrow-purpose token (a stream ticket).
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = self.decode(token)?;
        if claims.purpose.is_some() {
            return Err(AuthError::InvalidClaims("a ticket is not a bearer token"));
        }
        Ok(claims)
    }

    /// Checks a stream ticket: like [`Self::verify`], and it must be a ticket.
    pub fn verify_ticket(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = self.decode(token)?;
        if claims.purpose.as_deref() != Some(TICKET_PURPOSE) {
            return Err(AuthError::InvalidClaims("not a stream ticket"));
        }
        Ok(claims)
    }

    fn decode(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token)?;
        let key = match header.alg {
            Algorithm::HS256 => &self.hs256,
            Algorithm::RS256 => self.rs256.as_ref().ok_or(AuthError::InvalidClaims(
                "RS256 tokens are not accepted here",
            ))?,
            _ => return Err(AuthError::InvalidClaims("unsupported signing algorithm")),
        };
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = self.leeway_secs;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)?.claims;
        claims.check()?;
        Ok(claims)
    }
}

/// Signs `claims` with the HS256 secret.
pub fn mint_hs256(secret: &str, claims: &Claims) -> Result<String, AuthError> {
    claims.check()?;
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a-test-secret-of-enough-length";

    fn verifier() -> Verifier {
        Verifier::new(&AuthConfig {
            hs256_secret: SECRET.to_owned(),
            rs256_public_key_pem: None,
            leeway_secs: 0,
        })
        .unwrap()
    }

    #[test]
    fn minted_token_verifies_to_the_same_claims() {
        let claims = Claims::user("u1", "Ada", "w1", Role::Member, chrono::Duration::hours(1));
        let token = mint_hs256(SECRET, &claims).unwrap();
        assert_eq!(verifier().verify(&token).unwrap(), claims);
    }

    #[test]
    fn wrong_secret_expired_and_inconsistent_tokens_are_refused() {
        let claims = Claims::user("u1", "Ada", "w1", Role::Owner, chrono::Duration::hours(1));
        let forged = mint_hs256("another-secret-of-enough-length", &claims).unwrap();
        assert!(verifier().verify(&forged).is_err());

        let expired = Claims::user("u1", "Ada", "w1", Role::Owner, chrono::Duration::hours(-1));
        let token = mint_hs256(SECRET, &expired).unwrap();
        assert!(verifier().verify(&token).is_err());

        let mut runner_in_workspace = Claims::runner("agent-runner", chrono::Duration::hours(1));
        runner_in_workspace.workspace_id = Some("w1".into());
        assert!(mint_hs256(SECRET, &runner_in_workspace).is_err());
    }

    #[test]
    fn a_ticket_is_not_a_bearer_token_and_a_bearer_token_is_not_a_ticket() {
        let claims = Claims::user("u1", "Ada", "w1", Role::Viewer, chrono::Duration::hours(1));
        let bearer = mint_hs256(SECRET, &claims).unwrap();
        let ticket = mint_hs256(SECRET, &claims.ticket(chrono::Duration::seconds(60))).unwrap();
        assert!(verifier().verify(&ticket).is_err());
        assert!(verifier().verify_ticket(&bearer).is_err());
        let verified = verifier().verify_ticket(&ticket).unwrap();
        assert_eq!(
            (verified.sub.as_str(), verified.workspace_id.as_deref()),
            ("u1", Some("w1"))
        );
    }

    #[test]
    fn runner_token_has_no_workspace() {
        let claims = Claims::runner("agent-runner", chrono::Duration::hours(1));
        let token = mint_hs256(SECRET, &claims).unwrap();
        let verified = verifier().verify(&token).unwrap();
        assert_eq!(verified.role, Role::Runner);
        assert_eq!(verified.actor().workspace_id, None);
    }
}
