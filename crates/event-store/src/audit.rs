//! Reading a stream back for auditors: its events with their chain fields as text
//! ([`ChainRecord`]), its head from `event_heads`, the erasure events that cover it, and
//! [`verify_chain`], which feeds them to the one verification core in [`crate::chain`].

use sqlx::{Executor, PgPool, Postgres, Row};

use crate::StoreError;
use crate::chain::{
    ChainRecord, ChainReport, ChainVerifier, ERASURE_AGGREGATE_TYPE, ERASURE_EVENT_TYPE, Head,
    erasures_of,
};

/// The columns of a [`ChainRecord`], every one as the text the digests are computed over.
pub const CHAIN_COLUMNS: &str = "event_id::text, aggregate_type, aggregate_id, sequence, \
    event_type, event_version, \
    to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
    payload::text, metadata::text, encode(payload_digest, 'hex'), encode(event_digest, 'hex'), \
    encode(prev_hash, 'hex'), encode(hash, 'hex'), erased_at IS NOT NULL";

/// How many events [`verify_chain`] reads per query.
const VERIFY_PAGE: i64 = 1000;

/// Up to `limit` events of one stream with `sequence > after`, in sequence order.
pub async fn read_stream<'e>(
    executor: impl Executor<'e, Database = Postgres>,
    aggregate_type: &str,
    aggregate_id: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<ChainRecord>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {CHAIN_COLUMNS} FROM events \
          WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 \
          ORDER BY sequence LIMIT $4"
    ))
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(after)
    .bind(limit)
    .fetch_all(executor)
    .await?;
    rows.iter().map(chain_record).collect()
}

/// Maps a row selected with [`CHAIN_COLUMNS`] first.
pub fn chain_record(row: &sqlx::postgres::PgRow) -> Result<ChainRecord, sqlx::Error> {
    Ok(ChainRecord {
        event_id: row.try_get(0)?,
        aggregate_type: row.try_get(1)?,
        aggregate_id: row.try_get(2)?,
        sequence: row.try_get(3)?,
        event_type: row.try_get(4)?,
        event_version: row.try_get(5)?,
        recorded_at: row.try_get(6)?,
        payload: row.try_get(7)?,
        metadata: row.try_get(8)?,
        payload_digest: row.try_get(9)?,
        event_digest: row.try_get(10)?,
        prev_hash: row.try_get(11)?,
        hash: row.try_get(12)?,
        erased: row.try_get(13)?,
    })
}

/// The stream's head as recorded in `event_heads` (written in every append's transaction).
pub async fn read_head<'e>(
    executor: impl Executor<'e, Database = Postgres>,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Option<Head>, sqlx::Error> {
    let row: Option<(i64, String)> = sqlx::query_as(
        "SELECT sequence, encode(hash, 'hex') FROM event_heads \
          WHERE aggregate_type = $1 AND aggregate_id = $2",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|(sequence, hash)| Head {
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: aggregate_id.to_owned(),
        sequence,
        hash,
    }))
}

/// The erasure events that list an event of this stream, in the order they were appended.
pub async fn read_erasures<'e>(
    executor: impl Executor<'e, Database = Postgres>,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<ChainRecord>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {CHAIN_COLUMNS} FROM events \
          WHERE aggregate_type = $1 AND event_type = $2 \
            AND payload -> $2 -> 'events' @> jsonb_build_array(jsonb_build_object( \
                'aggregate_type', $3::text, 'aggregate_id', $4::text)) \
          ORDER BY position"
    ))
    .bind(ERASURE_AGGREGATE_TYPE)
    .bind(ERASURE_EVENT_TYPE)
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_all(executor)
    .await?;
    rows.iter().map(chain_record).collect()
}

/// Verifies one stream in the database: its events a page at a time, against its head and the
/// erasure events that cover it (each accepted only when its own one-event stream verifies).
pub async fn verify_chain(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<ChainReport, StoreError> {
    let mut verifier = ChainVerifier::new(aggregate_type, aggregate_id);
    for erasure in read_erasures(pool, aggregate_type, aggregate_id).await? {
        let head = read_head(pool, &erasure.aggregate_type, &erasure.aggregate_id).await?;
        let own = read_stream(pool, &erasure.aggregate_type, &erasure.aggregate_id, 0, 2).await?;
        let report = crate::chain::verify_records(
            &erasure.aggregate_type,
            &erasure.aggregate_id,
            &own,
            [],
            head.as_ref(),
        );
        if report.is_intact() {
            for covered in erasures_of(&erasure).unwrap_or_default() {
                verifier.add_erasure(covered);
            }
        }
    }
    let head = read_head(pool, aggregate_type, aggregate_id).await?;
    let mut after = 0;
    loop {
        let page = read_stream(pool, aggregate_type, aggregate_id, after, VERIFY_PAGE).await?;
        for record in &page {
            verifier.push(record);
            after = record.sequence;
        }
        if (page.len() as i64) < VERIFY_PAGE {
            break;
        }
    }
    Ok(verifier.finish(head.as_ref()))
}
