//! Bearer JWTs for Canopy: the claims both APIs accept, minting (for `canopy token` and tests)
//! and verification (HS256 with a shared secret, and RS256 with a public key when configured).
//!
//! A token names its subject (user id), display name, optional email (used for commit
//! authorship), workspace and role from the role table in `canopy_domain::Role`, or the service
//! role `runner`, which is not bound to one workspace.
//!
//! Each kind of token has its own audience (`aud`) and is accepted only where that kind is:
//! people's tokens ([`AUDIENCE_PEOPLE`]), the runner's ([`AUDIENCE_RUNNER`]) and stream tickets
//! ([`AUDIENCE_TICKET`]). The runner's tokens have their own trust root too: they are signed
//! with a key derived from the runner secret ([`runner_key`]), never with the key of people's
//! tokens, so a person's key cannot mint a runner token and a runner host need not hold the key
//! that mints people's tokens. A stream ticket is bound to one stream (a session's, or the
//! workspace's) and expires with the bearer token it was minted from, if not sooner.

use canopy_domain::{Actor, Role};
use chrono::Utc;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The HS256 secret used when none is configured: for development only. The services log a
/// warning when they run with it.
pub const DEV_SECRET: &str = "canopy-dev-secret-not-for-production";

/// Issuer written into and required from every token.
pub const ISSUER: &str = "canopy";

/// Audience of people's bearer tokens (an identity provider's RS256 tokens must name it too).
pub const AUDIENCE_PEOPLE: &str = "canopy";
/// Audience of the agent runner's tokens.
pub const AUDIENCE_RUNNER: &str = "canopy-runner";
/// Audience of stream tickets.
pub const AUDIENCE_TICKET: &str = "canopy-stream";

/// The stream a ticket for the workspace-wide stream is bound to.
pub const WORKSPACE_STREAM: &str = "workspace";

/// The stream a ticket for session `session_id`'s stream is bound to.
pub fn session_stream(session_id: impl std::fmt::Display) -> String {
    format!("session:{session_id}")
}

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
    /// The kind of token: [`AUDIENCE_PEOPLE`], [`AUDIENCE_RUNNER`] or [`AUDIENCE_TICKET`].
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
    /// A ticket's stream: [`session_stream`] or [`WORKSPACE_STREAM`]; absent on bearer tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// A ticket's bearer token's expiry: a stream opened with the ticket ends then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_exp: Option<i64>,
}

/// The longest a stream ticket is valid for opening a stream.
pub const TICKET_TTL_SECS: i64 = 60;

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
            aud: AUDIENCE_PEOPLE.to_owned(),
            iat: now,
            exp: now + ttl.num_seconds(),
            stream: None,
            bearer_exp: None,
        }
    }

    /// A stream ticket for the same person, for `stream` only ([`session_stream`] or
    /// [`WORKSPACE_STREAM`]), valid for `ttl` (at most [`TICKET_TTL_SECS`]) and never past this
    /// token's own expiry; a stream opened with it ends when this token expires.
    pub fn ticket(&self, stream: impl Into<String>, ttl: chrono::Duration) -> Self {
        let now = Utc::now().timestamp();
        let ttl = ttl.num_seconds().min(TICKET_TTL_SECS);
        Self {
            aud: AUDIENCE_TICKET.to_owned(),
            iat: now,
            exp: (now + ttl).min(self.exp),
            stream: Some(stream.into()),
            bearer_exp: Some(self.exp),
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
            aud: AUDIENCE_RUNNER.to_owned(),
            iat: now,
            exp: now + ttl.num_seconds(),
            stream: None,
            bearer_exp: None,
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

    /// When whatever this token opened must end (unix seconds): a ticket's bearer token's
    /// expiry, else the token's own.
    pub fn valid_until(&self) -> i64 {
        self.bearer_exp.unwrap_or(self.exp)
    }

    fn check(&self) -> Result<(), AuthError> {
        if self.sub.trim().is_empty() || self.name.trim().is_empty() {
            return Err(AuthError::InvalidClaims("sub and name must not be empty"));
        }
        let ticket_fields = self.stream.is_some() || self.bearer_exp.is_some();
        match self.aud.as_str() {
            AUDIENCE_RUNNER if self.role != Role::Runner => {
                return Err(AuthError::InvalidClaims(
                    "a runner token has the runner role",
                ));
            }
            AUDIENCE_PEOPLE | AUDIENCE_TICKET if self.role == Role::Runner => {
                return Err(AuthError::InvalidClaims(
                    "the runner role needs a runner token",
                ));
            }
            AUDIENCE_TICKET if self.stream.is_none() || self.bearer_exp.is_none() => {
                return Err(AuthError::InvalidClaims(
                    "a ticket names its stream and its bearer's expiry",
                ));
            }
            AUDIENCE_PEOPLE | AUDIENCE_RUNNER if ticket_fields => {
                return Err(AuthError::InvalidClaims("only a ticket names a stream"));
            }
            AUDIENCE_PEOPLE | AUDIENCE_RUNNER | AUDIENCE_TICKET => {}
            _ => return Err(AuthError::InvalidClaims("unknown audience")),
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

/// The HS256 key of runner tokens made from the runner secret: a key of its own, so that no
/// token of another kind is ever signed with it, even where one secret is configured for both
/// (development).
pub fn runner_key(runner_secret: &str) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(b"canopy runner token key\0");
    hash.update(runner_secret.as_bytes());
    hash.finalize().to_vec()
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
    /// Shared HS256 secret: it signs stream tickets, and people's bearer tokens when
    /// `accept_hs256` says so.
    pub hs256_secret: String,
    /// Whether bearer tokens signed with the HS256 secret are accepted. A deployment with an
    /// RS256 key turns it off, so that the shared secret cannot mint a person's token.
    pub accept_hs256: bool,
    /// Optional RS256 public key (PEM); tokens signed with RS256 are accepted when set.
    pub rs256_public_key_pem: Option<String>,
    /// The secret runner tokens are signed with ([`runner_key`]); the HS256 secret when unset
    /// (development).
    pub runner_secret: Option<String>,
    /// Clock skew tolerated on `exp`, in seconds.
    pub leeway_secs: u64,
}

/// Verifies bearer tokens.
#[derive(Clone)]
pub struct Verifier {
    /// People's bearer tokens signed with the shared secret, when accepted.
    hs256: Option<DecodingKey>,
    /// Stream tickets (always HS256: this deployment mints them).
    tickets: DecodingKey,
    /// Runner tokens.
    runner: DecodingKey,
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
        if config.runner_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err(AuthError::InvalidKey(
                "the runner secret must be at least 16 bytes".to_owned(),
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
        if !config.accept_hs256 && rs256.is_none() {
            return Err(AuthError::InvalidKey(
                "no way to verify bearer tokens: HS256 is off and no RS256 key is set".to_owned(),
            ));
        }
        let secret = DecodingKey::from_secret(config.hs256_secret.as_bytes());
        let runner_secret = config
            .runner_secret
            .as_deref()
            .unwrap_or(&config.hs256_secret);
        Ok(Self {
            hs256: config.accept_hs256.then(|| secret.clone()),
            tickets: secret,
            runner: DecodingKey::from_secret(&runner_key(runner_secret)),
            rs256,
            leeway_secs: config.leeway_secs,
        })
    }

    /// Checks a bearer token, a person's or the runner's: signature, issuer, audience, expiry
    /// and the claims' own consistency. A stream ticket is not a bearer token; a runner token
    /// verifies only with the runner key, a person's only with people's keys.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token)?;
        match header.alg {
            Algorithm::HS256 => {
                // the runner's key first: it is always there, people's HS256 key may not be
                match self.decode(token, Algorithm::HS256, &self.runner, AUDIENCE_RUNNER) {
                    Ok(claims) => Ok(claims),
                    Err(runner_error) => match &self.hs256 {
                        Some(key) => self.decode(token, Algorithm::HS256, key, AUDIENCE_PEOPLE),
                        None => Err(runner_error),
                    },
                }
            }
            Algorithm::RS256 => {
                let key = self.rs256.as_ref().ok_or(AuthError::InvalidClaims(
                    "RS256 tokens are not accepted here",
                ))?;
                self.decode(token, Algorithm::RS256, key, AUDIENCE_PEOPLE)
            }
            _ => Err(AuthError::InvalidClaims("unsupported signing algorithm")),
        }
    }

    /// Checks a stream ticket: like [`Self::verify`], and it must be a ticket (the caller
    /// checks that its `stream` is the one being opened).
    pub fn verify_ticket(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token)?;
        if header.alg != Algorithm::HS256 {
            return Err(AuthError::InvalidClaims("not a stream ticket"));
        }
        self.decode(token, Algorithm::HS256, &self.tickets, AUDIENCE_TICKET)
    }

    fn decode(
        &self,
        token: &str,
        alg: Algorithm,
        key: &DecodingKey,
        audience: &str,
    ) -> Result<Claims, AuthError> {
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        validation.leeway = self.leeway_secs;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)?.claims;
        if claims.aud != audience {
            return Err(AuthError::InvalidClaims("wrong audience"));
        }
        claims.check()?;
        Ok(claims)
    }
}

/// Signs `claims` with HS256: people's tokens and tickets with `secret` itself, runner tokens
/// with the [`runner_key`] of `secret` (pass the runner secret where one is configured).
pub fn mint_hs256(secret: &str, claims: &Claims) -> Result<String, AuthError> {
    claims.check()?;
    let key = if claims.aud == AUDIENCE_RUNNER {
        EncodingKey::from_secret(&runner_key(secret))
    } else {
        EncodingKey::from_secret(secret.as_bytes())
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &key,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a-test-secret-of-enough-length";

    fn verifier() -> Verifier {
        Verifier::new(&AuthConfig {
            accept_hs256: true,
            hs256_secret: SECRET.to_owned(),
            rs256_public_key_pem: None,
            runner_secret: None,
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
        let ticket = mint_hs256(
            SECRET,
            &claims.ticket(WORKSPACE_STREAM, chrono::Duration::seconds(60)),
        )
        .unwrap();
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

    const RS256_PRIVATE: &str = include_str!("../tests/keys/test-rs256-private.pem");
    const RS256_PUBLIC: &str = include_str!("../tests/keys/test-rs256-public.pem");

    fn rs256_token(claims: &Claims) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            claims,
            &EncodingKey::from_rsa_pem(RS256_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn with_an_rs256_key_and_hs256_off_the_shared_secret_mints_no_bearer_token() {
        let verifier = Verifier::new(&AuthConfig {
            hs256_secret: SECRET.to_owned(),
            accept_hs256: false,
            rs256_public_key_pem: Some(RS256_PUBLIC.to_owned()),
            runner_secret: None,
            leeway_secs: 0,
        })
        .unwrap();
        let claims = Claims::user("u1", "U", "w1", Role::Owner, chrono::Duration::hours(1));
        let forged = mint_hs256(SECRET, &claims).unwrap();
        assert!(verifier.verify(&forged).is_err());
        assert_eq!(verifier.verify(&rs256_token(&claims)).unwrap(), claims);
        // stream tickets are still this deployment's own HS256 tokens
        let ticket = mint_hs256(
            SECRET,
            &claims.ticket(WORKSPACE_STREAM, chrono::Duration::seconds(60)),
        )
        .unwrap();
        assert!(verifier.verify_ticket(&ticket).is_ok());
        // and an RS256 token is never a ticket
        let rs_ticket =
            rs256_token(&claims.ticket(WORKSPACE_STREAM, chrono::Duration::seconds(60)));
        assert!(verifier.verify_ticket(&rs_ticket).is_err());
    }

    #[test]
    fn hs256_off_without_an_rs256_key_is_refused() {
        let refused = Verifier::new(&AuthConfig {
            hs256_secret: SECRET.to_owned(),
            accept_hs256: false,
            rs256_public_key_pem: None,
            runner_secret: None,
            leeway_secs: 0,
        });
        assert!(refused.is_err());
    }
    #[test]
    fn each_kind_of_token_has_its_audience_and_the_runner_its_own_key() {
        let runner = Claims::runner("agent-runner", chrono::Duration::hours(1));
        assert_eq!(runner.aud, AUDIENCE_RUNNER);
        // a runner token signed with people's key (the old trust root) is refused
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &runner,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(verifier().verify(&forged).is_err());
        // as is a person's token claiming the runner role, or no audience at all
        let mut person_as_runner =
            Claims::user("u1", "U", "w1", Role::Owner, chrono::Duration::hours(1));
        person_as_runner.role = Role::Runner;
        person_as_runner.workspace_id = None;
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &person_as_runner,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(verifier().verify(&token).is_err());
        let mut no_audience = serde_json::to_value(Claims::user(
            "u1",
            "U",
            "w1",
            Role::Owner,
            chrono::Duration::hours(1),
        ))
        .unwrap();
        no_audience.as_object_mut().unwrap().remove("aud");
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &no_audience,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(verifier().verify(&token).is_err());

        // with a runner secret of its own, people's secret mints no runner token
        let separate = Verifier::new(&AuthConfig {
            hs256_secret: SECRET.to_owned(),
            accept_hs256: true,
            rs256_public_key_pem: None,
            runner_secret: Some("the-runner-secret-0123456789".to_owned()),
            leeway_secs: 0,
        })
        .unwrap();
        assert!(
            separate
                .verify(&mint_hs256(SECRET, &runner).unwrap())
                .is_err()
        );
        let verified = separate
            .verify(&mint_hs256("the-runner-secret-0123456789", &runner).unwrap())
            .unwrap();
        assert_eq!(verified.role, Role::Runner);
        // and the runner secret mints no person's token
        let person = Claims::user("u1", "U", "w1", Role::Owner, chrono::Duration::hours(1));
        assert!(
            separate
                .verify(&mint_hs256("the-runner-secret-0123456789", &person).unwrap())
                .is_err()
        );
    }

    #[test]
    fn a_ticket_is_bound_to_one_stream_and_never_outlives_its_bearer() {
        let bearer = Claims::user(
            "u1",
            "Ada",
            "w1",
            Role::Member,
            chrono::Duration::seconds(5),
        );
        let ticket = bearer.ticket(session_stream("s1"), chrono::Duration::seconds(600));
        assert_eq!(ticket.stream.as_deref(), Some("session:s1"));
        assert!(ticket.exp <= bearer.exp, "a ticket outlived its bearer");
        assert_eq!(ticket.valid_until(), bearer.exp);
        let long = Claims::user("u1", "Ada", "w1", Role::Member, chrono::Duration::hours(1));
        let ticket = long.ticket(WORKSPACE_STREAM, chrono::Duration::hours(1));
        assert!(ticket.exp - ticket.iat <= TICKET_TTL_SECS);
        let verified = verifier()
            .verify_ticket(&mint_hs256(SECRET, &ticket).unwrap())
            .unwrap();
        assert_eq!(verified.stream.as_deref(), Some(WORKSPACE_STREAM));
        // a ticket without a stream is refused
        let mut unbound = ticket.clone();
        unbound.stream = None;
        assert!(mint_hs256(SECRET, &unbound).is_err());
    }
}
