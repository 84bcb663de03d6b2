//! Listing with filters and keyset pagination, read-your-writes waits, and the extractors that
//! read query strings and path ids.
//!
//! Lists page on `(created_xid, created_position)`, the relay order of the event that created
//! each row, which is the order the projectors insert rows in: a row added while a client pages
//! comes after every row that existed before it, so paging forward returns every row once. The
//! cursor is opaque to clients (its pattern is documented so that a client can tell a mangled
//! one).
//!
//! Every parameter's constraints are in its schema, and the server enforces exactly those: a
//! value that breaks one is 422 `validation_failed` naming the parameter ([`Params`], [`Ids`]).

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer};
use sqlx::{Postgres, QueryBuilder};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Reader;
use crate::error::ApiError;

pub(crate) const DEFAULT_LIMIT: u32 = 50;
pub(crate) const MAX_LIMIT: u32 = 200;

/// The longest free-text filter, in characters (its documented pattern refuses control
/// characters: `^[^\u0000-\u001f\u007f-\u009f]*$`).
pub(crate) const MAX_TEXT: usize = 255;

/// A query string read into `T`; a parameter that does not parse is 422 naming it.
#[derive(Debug)]
pub(crate) struct Params<T>(pub(crate) T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        canopy_http::params::query(parts.uri.query())
            .map(Self)
            .map_err(|error| ApiError::Validation(vec![error]))
    }
}

/// The route's path ids (one `Uuid` or a pair); one that is not a UUID is 422 naming it.
#[derive(Debug)]
pub(crate) struct Ids<T>(pub(crate) T);

impl<S: Send + Sync, T: canopy_http::params::FromIds> FromRequestParts<S> for Ids<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        use canopy_http::params::PathError;
        match canopy_http::params::path_ids(parts).await {
            Ok(ids) => Ok(Self(ids)),
            Err(PathError::Invalid(errors)) => Err(ApiError::Validation(errors)),
            Err(PathError::Mismatch(error)) => Err(ApiError::internal(anyhow::anyhow!(error))),
        }
    }
}

/// A free-text filter: at most [`MAX_TEXT`] characters, no control characters.
pub(crate) fn check_text(field: &str, value: Option<&str>) -> Result<(), ApiError> {
    let Some(value) = value else {
        return Ok(());
    };
    if value.chars().count() > MAX_TEXT {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {MAX_TEXT} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Oldest first or newest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Order {
    Asc,
    #[default]
    Desc,
}

/// Paging of a list.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PageParams {
    /// Rows per page (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page (opaque: the hex digits of `<xid>:<position>`).
    #[param(pattern = "^(3[0-9]){1,19}3a(3[0-9]){1,19}$", example = "3132333a3435")]
    pub cursor: Option<String>,
    /// `desc` (newest first, the default) or `asc`.
    #[param(inline)]
    pub order: Option<Order>,
}

/// Read-your-writes: wait (boundedly) until the projection has caught up with a command's
/// answer, `<aggregate_id>:<version>`; 409 `not_yet_consistent` when it does not in time.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ConsistencyParams {
    /// `<aggregate_id>:<version>` from a command's answer.
    #[param(
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}:[0-9]{1,18}$",
        example = "7f1c0a52-64a5-4b8e-9d57-3c1c2b7e0a11:7"
    )]
    pub consistent_with: Option<String>,
}

/// A time range on a list's main time column (a range whose `to` is not after its `from` is
/// empty).
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct TimeRange {
    /// Inclusive lower bound (RFC 3339).
    #[serde(default, deserialize_with = "rfc3339")]
    pub from: Option<DateTime<Utc>>,
    /// Exclusive upper bound (RFC 3339).
    #[serde(default, deserialize_with = "rfc3339")]
    pub to: Option<DateTime<Utc>>,
}

/// An RFC 3339 date-time (what `format: date-time` means), in any offset, of a year RFC 3339
/// can write (0001 to 9999; chrono reads wider years PostgreSQL cannot hold).
fn rfc3339<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    use chrono::Datelike;
    let text = String::deserialize(deserializer)?;
    let time = DateTime::parse_from_rfc3339(&text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| {
            serde::de::Error::custom(format!("must be an RFC 3339 date-time: {error}"))
        })?;
    if !(1..=9999).contains(&time.year()) {
        return Err(serde::de::Error::custom(
            "must be an RFC 3339 date-time between the years 0001 and 9999",
        ));
    }
    Ok(Some(time))
}

/// A page's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) xid: i64,
    pub(crate) position: i64,
}

impl Cursor {
    pub(crate) fn encode(self) -> String {
        hex::encode(format!("{}:{}", self.xid, self.position))
    }

    /// Exactly what the documented pattern admits: the lowercase hex digits of `<xid>:<position>`,
    /// each 1 to 19 decimal digits (a number past the largest position reads as the largest).
    fn decode(text: &str) -> Result<Self, ApiError> {
        let invalid = || ApiError::invalid("cursor", "not a cursor this API returned");
        let mut raw = String::with_capacity(text.len() / 2);
        for pair in text.as_bytes().chunks(2) {
            match pair {
                [b'3', digit @ b'0'..=b'9'] => raw.push(char::from(*digit)),
                [b'3', b'a'] => raw.push(':'),
                _ => return Err(invalid()),
            }
        }
        let number = |digits: &str| {
            if !(1..=19).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            let value: u64 = digits.parse().map_err(|_| invalid())?;
            Ok(i64::try_from(value).unwrap_or(i64::MAX))
        };
        let (xid, position) = raw.split_once(':').ok_or_else(invalid)?;
        Ok(Self {
            xid: number(xid)?,
            position: number(position)?,
        })
    }
}

/// A filter on one column.
#[derive(Debug, Clone)]
pub(crate) enum Filter {
    Text(&'static str, String),
    Id(&'static str, Uuid),
    From(&'static str, DateTime<Utc>),
    To(&'static str, DateTime<Utc>),
}

/// Builds `SELECT <columns> FROM <relation> WHERE workspace_id = … AND <filters> AND <keyset>
/// ORDER BY … LIMIT limit + 1` (one extra row says whether there is a next page).
pub(crate) fn list_query<'a>(
    relation: &str,
    columns: &str,
    workspace_id: &'a str,
    filters: &'a [Filter],
    page: &PageParams,
) -> Result<(QueryBuilder<'a, Postgres>, u32, Order), ApiError> {
    let limit = page.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be 1 to {MAX_LIMIT}"),
        ));
    }
    let order = page.order.unwrap_or_default();
    let mut query = QueryBuilder::new(format!(
        "SELECT {columns}, created_xid, created_position FROM {relation} WHERE workspace_id = "
    ));
    query.push_bind(workspace_id);
    for filter in filters {
        match filter {
            Filter::Text(column, value) => {
                query
                    .push(format!(" AND {column} = "))
                    .push_bind(value.as_str());
            }
            Filter::Id(column, value) => {
                query.push(format!(" AND {column} = ")).push_bind(*value);
            }
            Filter::From(column, value) => {
                query.push(format!(" AND {column} >= ")).push_bind(*value);
            }
            Filter::To(column, value) => {
                query.push(format!(" AND {column} < ")).push_bind(*value);
            }
        }
    }
    let (compare, direction) = match order {
        Order::Asc => (">", "ASC"),
        Order::Desc => ("<", "DESC"),
    };
    if let Some(cursor) = &page.cursor {
        let cursor = Cursor::decode(cursor)?;
        query
            .push(format!(" AND (created_xid, created_position) {compare} ("))
            .push_bind(cursor.xid)
            .push(", ")
            .push_bind(cursor.position)
            .push(")");
    }
    query.push(format!(
        " ORDER BY created_xid {direction}, created_position {direction} LIMIT {}",
        limit + 1
    ));
    Ok((query, limit, order))
}

/// Time-range filters on `column` (`to` not after `from` selects nothing, as SQL says).
pub(crate) fn time_filters(column: &'static str, range: &TimeRange) -> Vec<Filter> {
    let mut filters = Vec::new();
    if let Some(from) = range.from {
        filters.push(Filter::From(column, from));
    }
    if let Some(to) = range.to {
        filters.push(Filter::To(column, to));
    }
    filters
}

/// Rows that carry their listing position.
pub(crate) trait Listed {
    fn cursor(&self) -> Cursor;
}

/// Trims the extra row and computes the next cursor.
pub(crate) fn page_of<T: Listed>(mut rows: Vec<T>, limit: u32) -> (Vec<T>, Option<String>) {
    if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        let next = rows.last().map(|row| row.cursor().encode());
        (rows, next)
    } else {
        (rows, None)
    }
}

/// The reads of each person waiting for `consistent_with` in this process.
#[derive(Debug)]
pub(crate) struct Waits {
    per_person: usize,
    waiting: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// One waiting read; dropping it frees its place.
#[derive(Debug)]
pub(crate) struct Waiting<'a> {
    waits: &'a Waits,
    person: String,
}

impl Waits {
    pub(crate) fn new(per_person: usize) -> Self {
        Self {
            per_person: per_person.max(1),
            waiting: std::sync::Mutex::default(),
        }
    }

    fn enter(&self, person: &str) -> Result<Waiting<'_>, ApiError> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let theirs = waiting.entry(person.to_owned()).or_default();
        if *theirs >= self.per_person {
            metrics::counter!("canopy_consistency_waits_refused_total").increment(1);
            return Err(ApiError::TooManyWaits {
                limit: self.per_person,
            });
        }
        *theirs += 1;
        Ok(Waiting {
            waits: self,
            person: person.to_owned(),
        })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiting = self.waits.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = waiting.get_mut(&self.person) {
            *count -= 1;
            if *count == 0 {
                waiting.remove(&self.person);
            }
        }
    }
}

/// The first and the longest pause between two looks at a projection's position.
const FIRST_POLL: Duration = Duration::from_millis(20);
const MAX_POLL: Duration = Duration::from_millis(250);

/// Waits until `positions` (a projection's positions table) holds `consistent_with`'s version.
///
/// Only the reader's own aggregates are waited for: one of another workspace answers at once
/// exactly as one that does not exist (409 `not_yet_consistent`), so the answer tells nothing
/// about other workspaces. The aggregate's workspace is read from its first event (it exists
/// before the command that gave the version answered). The position is polled with a doubling
/// pause (20 ms to 250 ms, about a dozen queries in the default 2 s), and each person may have
/// only so many reads waiting at once (429 `too_many_waits`).
pub(crate) async fn wait_consistent(
    state: &AppState,
    reader: &Reader,
    positions: &str,
    params: &ConsistencyParams,
) -> Result<(), ApiError> {
    let Some(token) = &params.consistent_with else {
        return Ok(());
    };
    let invalid = || ApiError::invalid("consistent_with", "must be <aggregate_id>:<version>");
    let (aggregate_id, version) = token.rsplit_once(':').ok_or_else(invalid)?;
    let aggregate_id = canopy_http::params::parse_uuid(aggregate_id)
        .ok_or_else(invalid)?
        .to_string();
    if !(1..=18).contains(&version.len()) || !version.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let version: i64 = version.parse().map_err(|_| invalid())?;
    let not_yet = |aggregate_id: String| ApiError::NotYetConsistent {
        aggregate_id,
        version,
    };
    let _waiting = state.waits.enter(&reader.person)?;
    let aggregate_type = match positions {
        "features_positions" => "feature",
        _ => "session",
    };
    let ours: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events
                         WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = 1
                           AND payload -> event_type ->> 'workspace_id' = $3)",
    )
    .bind(aggregate_type)
    .bind(&aggregate_id)
    .bind(&reader.workspace_id)
    .fetch_one(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    if !ours {
        return Err(not_yet(aggregate_id));
    }
    let deadline = tokio::time::Instant::now() + state.consistency_timeout;
    let mut pause = FIRST_POLL;
    loop {
        let projected: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT max(version) FROM read.{positions} WHERE aggregate_id = $1"
        ))
        .bind(&aggregate_id)
        .fetch_one(&state.pool)
        .await
        .map_err(ApiError::internal)?;
        if projected.is_some_and(|projected| projected >= version) {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(not_yet(aggregate_id));
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_POLL);
    }
}
