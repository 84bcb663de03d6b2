//! Query strings and path parameters read into typed values, naming the parameter that does not
//! parse: each API answers that with its 422 `validation_failed` problem, never with the
//! framework's plain-text 400.
//!
//! Every path parameter of Canopy's APIs is a UUID in its hyphenated form (what the documents
//! declare as `format: uuid`); [`path_ids`] checks each one by name before anything else reads
//! them.

use axum::extract::RawPathParams;
use axum::extract::rejection::RawPathParamsRejection;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::FieldError;

/// Reads a query string (`None` when the URI has none) into `T`: each field is one parameter,
/// so a value that does not parse (`?limit=abc`, `?to=`) names its parameter.
pub fn query<T: DeserializeOwned>(query: Option<&str>) -> Result<T, FieldError> {
    let pairs = form_urlencoded::parse(query.unwrap_or_default().as_bytes());
    let deserializer = serde_urlencoded::Deserializer::new(pairs);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let message = error.into_inner().to_string();
        FieldError {
            field: field_of(&path, &message),
            message,
        }
    })
}

/// The field an error of serde names: its path, or for an error about the whole value (a
/// missing or duplicate field) the field its message quotes.
pub fn field_of(path: &str, message: &str) -> String {
    if path != "." && !path.is_empty() {
        return path.to_owned();
    }
    for prefix in ["missing field `", "duplicate field `"] {
        if let Some(rest) = message.strip_prefix(prefix)
            && let Some((field, _)) = rest.split_once('`')
        {
            return field.to_owned();
        }
    }
    ".".to_owned()
}

/// Path parameters that are all UUIDs, in the order of the route's template.
pub trait FromIds: Sized {
    /// `None` when the route has another number of parameters.
    fn from_ids(ids: &[Uuid]) -> Option<Self>;
}

impl FromIds for Uuid {
    fn from_ids(ids: &[Uuid]) -> Option<Self> {
        match ids {
            [id] => Some(*id),
            _ => None,
        }
    }
}

impl FromIds for (Uuid, Uuid) {
    fn from_ids(ids: &[Uuid]) -> Option<Self> {
        match ids {
            [a, b] => Some((*a, *b)),
            _ => None,
        }
    }
}

/// Why the path's ids could not be read.
#[derive(Debug)]
pub enum PathError {
    /// Parameters that are not UUIDs, each named (answer 422).
    Invalid(Vec<FieldError>),
    /// The route and the extractor disagree on the parameters: a bug (answer 500).
    Mismatch(String),
}

/// Reads the route's path parameters, each a hyphenated UUID; every one that is not is named.
pub async fn path_ids<T: FromIds>(parts: &mut Parts) -> Result<T, PathError> {
    use axum::extract::FromRequestParts;
    let raw = match RawPathParams::from_request_parts(parts, &()).await {
        Ok(raw) => raw,
        Err(RawPathParamsRejection::InvalidUtf8InPathParam(error)) => {
            return Err(PathError::Invalid(vec![FieldError {
                field: "path".to_owned(),
                message: error.body_text(),
            }]));
        }
        Err(other) => return Err(PathError::Mismatch(other.body_text())),
    };
    let mut ids = Vec::new();
    let mut invalid = Vec::new();
    for (name, value) in &raw {
        match parse_uuid(value) {
            Some(id) => ids.push(id),
            None => invalid.push(FieldError {
                field: name.to_owned(),
                message: "must be a UUID (8-4-4-4-12 hex digits)".to_owned(),
            }),
        }
    }
    if !invalid.is_empty() {
        return Err(PathError::Invalid(invalid));
    }
    T::from_ids(&ids).ok_or_else(|| {
        PathError::Mismatch(format!(
            "the route has {} path parameters, the handler wants another number",
            ids.len()
        ))
    })
}

/// A UUID in its hyphenated form only (what JSON Schema's `format: uuid` accepts), in either
/// case.
pub fn parse_uuid(value: &str) -> Option<Uuid> {
    (value.len() == 36)
        .then(|| Uuid::try_parse(value).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Page {
        limit: Option<u32>,
        to: Option<chrono_free::Time>,
    }

    /// A stand-in for a time type: any value but the empty string.
    mod chrono_free {
        #[derive(Debug)]
        pub(super) struct Time;
        impl<'de> serde::Deserialize<'de> for Time {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                if text.is_empty() {
                    Err(serde::de::Error::custom("premature end of input"))
                } else {
                    Ok(Time)
                }
            }
        }
    }

    #[test]
    fn a_value_that_does_not_parse_names_its_parameter() {
        let page: Page = query(Some("limit=5&other=x")).unwrap();
        assert_eq!(page.limit, Some(5));
        assert!(page.to.is_none());
        assert_eq!(query::<Page>(Some("limit=abc")).unwrap_err().field, "limit");
        assert_eq!(query::<Page>(Some("to=")).unwrap_err().field, "to");
        assert_eq!(query::<Page>(Some("limit=-1")).unwrap_err().field, "limit");
        assert!(query::<Page>(None).is_ok());
    }

    #[test]
    fn only_hyphenated_uuids_are_ids() {
        let id = Uuid::new_v4();
        assert_eq!(parse_uuid(&id.to_string()), Some(id));
        assert_eq!(parse_uuid(&id.to_string().to_uppercase()), Some(id));
        assert_eq!(parse_uuid(&id.simple().to_string()), None);
        assert_eq!(parse_uuid(&format!("{{{id}}}")), None);
        assert_eq!(parse_uuid("not-a-uuid"), None);
    }

    #[test]
    fn whole_value_errors_name_the_field_they_quote() {
        assert_eq!(field_of(".", "missing field `title`"), "title");
        assert_eq!(field_of("", "duplicate field `limit`"), "limit");
        assert_eq!(field_of("steps[2]", "invalid type"), "steps[2]");
        assert_eq!(field_of(".", "invalid type: null"), ".");
    }
}
