//! What command-api and the webhook delivery service (`canopy-webhooks`) share about webhooks:
//!
//! - [`secret`]: signing secrets as the Standard Webhooks specification shapes them
//!   (`whsec_` + base64 of random bytes) and their fingerprints, the only trace of a secret
//!   an event may carry;
//! - [`signature`]: the `webhook-signature` header (`v1,<base64 HMAC-SHA256>` of
//!   `"{id}.{timestamp}.{body}"`, several separated by spaces while a rotated secret is still
//!   valid) and its verification, for integrators and tests;
//! - [`target`]: the SSRF check of a target URL. Names are resolved (through a [`Resolver`]
//!   a test can replace) and refused when an address is not public, by the sandbox egress's own
//!   rule ([`canopy_sandbox::is_public`]); the delivery connects to the very address it checked.

pub mod secret;
pub mod signature;
pub mod target;

pub use secret::{fingerprint, generate_secret};
pub use signature::{VerifyError, sign, verify};
pub use target::{
    CheckedTarget, Resolver, SystemResolver, TargetError, TargetPolicy, check_target,
};
