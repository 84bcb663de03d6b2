//! Input checks shared by both aggregates. Only emptiness is checked here: size limits are the
//! API's job, because they are about transport, not about what the domain means.

use crate::error::DomainError;

/// Refuses a blank `value`, naming `field` so the caller can point at it.
pub(crate) fn required(field: &'static str, value: &str) -> Result<(), DomainError> {
    if value.trim().is_empty() {
        Err(DomainError::InvalidCommand(field))
    } else {
        Ok(())
    }
}

/// Like [`required`] for an optional field: absent is fine, present-but-blank is not, since a
/// blank value is almost always a client bug rather than a deliberate "none".
pub(crate) fn optional(field: &'static str, value: Option<&str>) -> Result<(), DomainError> {
    value.map_or(Ok(()), |value| required(field, value))
}
