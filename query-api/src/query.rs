//! Listing with filters and keyset pagination, and read-your-writes waits.
//!
//! Lists page on `(created_xid, created_position)`, the relay order of the event that created
//! each row, which is the order the projectors insert rows in: a row added while a client pages
//! comes after every row that existed before it, so paging forward returns every row once. The
//! cursor is opaque to clients.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::{Postgres, QueryBuilder};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;

pub(crate) const DEFAULT_LIMIT: u32 = 50;
pub(crate) const MAX_LIMIT: u32 = 200;

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
    /// Rows per page (1 to 200, default 50).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// `desc` (newest first, the default) or `asc`.
    pub order: Option<Order>,
}

/// Read-your-writes: wait (boundedly) until the projection has caught up with a command's
/// answer, `<aggregate_id>:<version>`; 409 `not_yet_consistent` when it does not in time.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ConsistencyParams {
    pub consistent_with: Option<String>,
}

/// A time range on a list's main time column.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct TimeRange {
    /// Inclusive lower bound (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Exclusive upper bound (RFC 3339).
    pub to: Option<DateTime<Utc>>,
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

    fn decode(text: &str) -> Result<Self, ApiError> {
        let invalid = || ApiError::invalid("cursor", "not a cursor this API returned");
        let raw =
            String::from_utf8(hex::decode(text).map_err(|_| invalid())?).map_err(|_| invalid())?;
        let (xid, position) = raw.split_once(':').ok_or_else(invalid)?;
        Ok(Self {
            xid: xid.parse().map_err(|_| invalid())?,
            position: position.parse().map_err(|_| invalid())?,
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

/// Builds `SELECT <columns> FROM read.<table> WHERE workspace_id = … AND <filters> AND <keyset>
/// ORDER BY … LIMIT limit + 1` (one extra row says whether there is a next page).
pub(crate) fn list_query<'a>(
    table: &str,
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
        "SELECT {columns}, created_xid, created_position FROM read.{table} WHERE workspace_id = "
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

/// Time-range filters on `column`, checked for order.
pub(crate) fn time_filters(
    column: &'static str,
    range: &TimeRange,
) -> Result<Vec<Filter>, ApiError> {
    if let (Some(from), Some(to)) = (range.from, range.to)
        && from >= to
    {
        return Err(ApiError::invalid("to", "must be after from"));
    }
    let mut filters = Vec::new();
    if let Some(from) = range.from {
        filters.push(Filter::From(column, from));
    }
    if let Some(to) = range.to {
        filters.push(Filter::To(column, to));
    }
    Ok(filters)
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

/// Waits until `positions` (a projection's positions table) holds `consistent_with`'s version.
pub(crate) async fn wait_consistent(
    state: &AppState,
    positions: &str,
    params: &ConsistencyParams,
) -> Result<(), ApiError> {
    let Some(token) = &params.consistent_with else {
        return Ok(());
    };
    let invalid = || ApiError::invalid("consistent_with", "must be <aggregate_id>:<version>");
    let (aggregate_id, version) = token.rsplit_once(':').ok_or_else(invalid)?;
    let version: i64 = version.parse().map_err(|_| invalid())?;
    if aggregate_id.is_empty() || aggregate_id.len() > 128 || version < 0 {
        return Err(invalid());
    }
    let deadline = tokio::time::Instant::now() + state.consistency_timeout;
    loop {
        let projected: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT max(version) FROM read.{positions} WHERE aggregate_id = $1"
        ))
        .bind(aggregate_id)
        .fetch_one(&state.pool)
        .await
        .map_err(ApiError::internal)?;
        if projected.is_some_and(|projected| projected >= version) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::NotYetConsistent {
                aggregate_id: aggregate_id.to_owned(),
                version,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
