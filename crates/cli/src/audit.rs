//! `canopy audit`: export a session's or a workspace's events with their hash chain (NDJSON,
//! `docs/audit-format.md`), verify an export offline (no database, no server) and erase a
//! person's personal data without forging anything.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use canopy_domain::erasure::{ErasedEvent, Erasure, RecordErasure};
use canopy_domain::{Actor, Role};
use canopy_event_store::export::{FORMAT, Line, verify_export};
use canopy_event_store::{
    ActorKind, AggregateStore, ChainRecord, EventMetadata, Fence, Head, PgConnection, PgPool,
    StoreConfig, audit,
};
use canopy_relay::Cursor;
use uuid::Uuid;

use crate::DatabaseArgs;

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Write a session's (or a workspace's) events with their chain fields and heads as NDJSON.
    Export(ExportArgs),
    /// Check an export offline: every chain, head and erasure; names the first bad line.
    Verify {
        /// The NDJSON file `canopy audit export` wrote.
        file: PathBuf,
    },
    /// Replace a person's prompt texts and personal fields by their tombstone, recording the
    /// erasure as an event (per workspace).
    Erase(EraseArgs),
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The session to export.
    #[arg(required_unless_present = "workspace", conflicts_with = "workspace")]
    pub session: Option<Uuid>,
    /// Export every event of this workspace instead (sessions, features, erasures).
    #[arg(long)]
    pub workspace: Option<String>,
    /// Where to write the NDJSON.
    #[arg(long, short)]
    pub output: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct EraseArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Whose data to erase (user id).
    #[arg(long)]
    pub user: String,
    /// Why (e.g. the request's reference); recorded in the erasure event.
    #[arg(long)]
    pub reason: String,
    /// Who erases (your user id); recorded as the erasure's actor.
    #[arg(long)]
    pub by: String,
}

pub(crate) async fn run(args: AuditArgs) -> Result<String> {
    match args.command {
        AuditCommand::Export(args) => export(args).await,
        AuditCommand::Verify { file } => verify(&file),
        AuditCommand::Erase(args) => erase(args).await,
    }
}

const SESSION: &str = "session";
/// Events read per query while exporting.
const PAGE: i64 = 1000;
/// How long a workspace export waits for events below the horizon to reach the heads it took.
const HORIZON_WAIT: Duration = Duration::from_secs(60);

async fn export(args: ExportArgs) -> Result<String> {
    let pool = crate::ops::pool(&args.database).await?;
    let file = std::fs::File::create(&args.output)
        .with_context(|| format!("create {}", args.output.display()))?;
    let mut out = BufWriter::new(file);
    let scope = match (&args.session, &args.workspace) {
        (Some(session), _) => format!("session {session}"),
        (None, Some(workspace)) => format!("workspace {workspace}"),
        (None, None) => bail!("name a session or --workspace"),
    };
    write_line(
        &mut out,
        &Line::Export {
            format: FORMAT.to_owned(),
            exported_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            scope: scope.clone(),
        },
    )?;
    let events = match (args.session, args.workspace) {
        (Some(session), _) => export_session(&pool, &mut out, session).await?,
        (None, Some(workspace)) => export_workspace(&pool, &mut out, &workspace).await?,
        (None, None) => unreachable!("checked above"),
    };
    out.flush().context("write the export")?;
    Ok(format!(
        "exported {events} events of {scope} to {}",
        args.output.display()
    ))
}

async fn export_session(pool: &PgPool, out: &mut impl Write, session: Uuid) -> Result<usize> {
    let id = session.to_string();
    // The head first: the export holds the stream up to it, so a deleted newest event shows.
    let head = audit::read_head(pool, SESSION, &id)
        .await?
        .with_context(|| format!("no session {session}"))?;
    let mut count = 0;
    for erasure in audit::read_erasures(pool, SESSION, &id).await? {
        let erasure_head =
            audit::read_head(pool, &erasure.aggregate_type, &erasure.aggregate_id).await?;
        write_line(out, &Line::Event(Box::new(erasure)))?;
        count += 1;
        if let Some(erasure_head) = erasure_head {
            write_line(out, &Line::Head(erasure_head))?;
        }
    }
    let mut after = 0;
    loop {
        let page = audit::read_stream(pool, SESSION, &id, after, PAGE).await?;
        for record in page.iter().filter(|r| r.sequence <= head.sequence) {
            write_line(out, &Line::Event(Box::new(record.clone())))?;
            count += 1;
        }
        match page.last() {
            Some(last) if (page.len() as i64) == PAGE && last.sequence < head.sequence => {
                after = last.sequence;
            }
            _ => break,
        }
    }
    write_line(out, &Line::Head(head))?;
    Ok(count)
}

/// The workspace's events in relay order below the horizon, up to the heads taken first (a
/// consistent cut: later events and streams wait for the next export).
async fn export_workspace(pool: &PgPool, out: &mut impl Write, workspace: &str) -> Result<usize> {
    let heads: Vec<(String, String, i64, String)> = sqlx::query_as(
        "SELECT h.aggregate_type, h.aggregate_id, h.sequence, encode(h.hash, 'hex') \
           FROM event_heads h \
          WHERE EXISTS (SELECT 1 FROM events first \
                         WHERE first.aggregate_type = h.aggregate_type \
                           AND first.aggregate_id = h.aggregate_id AND first.sequence = 1 \
                           AND first.payload -> first.event_type ->> 'workspace_id' = $1)",
    )
    .bind(workspace)
    .fetch_all(pool)
    .await?;
    let mut heads: BTreeMap<(String, String), Head> = heads
        .into_iter()
        .map(|(aggregate_type, aggregate_id, sequence, hash)| {
            (
                (aggregate_type.clone(), aggregate_id.clone()),
                Head {
                    aggregate_type,
                    aggregate_id,
                    sequence,
                    hash,
                },
            )
        })
        .collect();
    let mut remaining = heads.len();
    let mut after = Cursor::START;
    let mut count = 0;
    let deadline = tokio::time::Instant::now() + HORIZON_WAIT;
    while remaining > 0 {
        let page = canopy_relay::history::chain_of_workspace(pool, after, workspace, PAGE as usize)
            .await?;
        if page.is_empty() {
            if tokio::time::Instant::now() > deadline {
                bail!("events below the heads did not commit within {HORIZON_WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for (cursor, record) in page {
            after = cursor;
            let key = (record.aggregate_type.clone(), record.aggregate_id.clone());
            let Some(head) = heads.get(&key) else {
                continue;
            };
            if record.sequence > head.sequence {
                continue;
            }
            if record.sequence == head.sequence {
                remaining -= 1;
            }
            write_line(out, &Line::Event(Box::new(record)))?;
            count += 1;
        }
    }
    for head in std::mem::take(&mut heads).into_values() {
        write_line(out, &Line::Head(head))?;
    }
    Ok(count)
}

fn write_line(out: &mut impl Write, line: &Line) -> Result<()> {
    serde_json::to_writer(&mut *out, line).context("write the export")?;
    out.write_all(b"\n").context("write the export")?;
    Ok(())
}

/// Offline: reads the file only.
fn verify(file: &PathBuf) -> Result<String> {
    let reader = BufReader::new(
        std::fs::File::open(file).with_context(|| format!("open {}", file.display()))?,
    );
    let report = verify_export(reader)?;
    if let Some(first) = report.problems.first() {
        let rest: Vec<String> = report
            .problems
            .iter()
            .skip(1)
            .map(|p| p.to_string())
            .collect();
        bail!(
            "{}: NOT intact: {first}{}",
            file.display(),
            if rest.is_empty() {
                String::new()
            } else {
                format!("\nalso:\n{}", rest.join("\n"))
            }
        );
    }
    Ok(format!(
        "{}: intact: {} events in {} streams, {} lines",
        file.display(),
        report.events,
        report.streams.len(),
        report.lines
    ))
}

type Candidate = (String, String, i64, Uuid, String, String, Option<String>);

async fn erase(args: EraseArgs) -> Result<String> {
    let pool = crate::ops::pool(&args.database).await?;
    // What the erasure will rewrite, with the tombstones' digests computed by the same function
    // the guard checks against.
    let candidates: Vec<Candidate> = sqlx::query_as(
        "SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_id, \
                encode(e.payload_digest, 'hex'), \
                encode(canopy_payload_digest( \
                    canopy_erasure_tombstone(e.event_type, e.event_version, e.payload)), 'hex'), \
                (SELECT first.payload -> first.event_type ->> 'workspace_id' FROM events first \
                  WHERE first.aggregate_type = e.aggregate_type \
                    AND first.aggregate_id = e.aggregate_id AND first.sequence = 1) \
           FROM events e \
          WHERE e.erased_at IS NULL \
            AND canopy_erasure_subject(e.event_type, e.payload) = $1 \
            AND canopy_erasure_tombstone(e.event_type, e.event_version, e.payload) <> e.payload \
          ORDER BY e.position",
    )
    .bind(&args.user)
    .fetch_all(&pool)
    .await?;
    let mut by_workspace: BTreeMap<String, Vec<ErasedEvent>> = BTreeMap::new();
    for (aggregate_type, aggregate_id, sequence, event_id, original, tombstone, workspace) in
        candidates
    {
        let workspace = workspace.with_context(|| {
            format!("{aggregate_type} {aggregate_id} names no workspace in its first event")
        })?;
        by_workspace
            .entry(workspace)
            .or_default()
            .push(ErasedEvent {
                aggregate_type,
                aggregate_id,
                sequence,
                event_id,
                original_digest: original,
                tombstone_digest: tombstone,
            });
    }
    if by_workspace.is_empty() {
        return Ok(format!("nothing to erase for user {}", args.user));
    }
    let store = AggregateStore::new(pool.clone(), StoreConfig::default());
    let mut lines = Vec::new();
    for (workspace, events) in by_workspace {
        let erasure_id = Uuid::new_v4();
        let fence = Tombstones {
            event_ids: events.iter().map(|e| e.event_id).collect(),
        };
        let count = events.len();
        let command = RecordErasure {
            actor: Actor::person(&args.by, &args.by, Role::Admin, &workspace),
            erasure_id,
            workspace_id: workspace.clone(),
            user_id: args.user.clone(),
            reason: args.reason.clone(),
            events,
        };
        let metadata = EventMetadata::new(&args.by, &args.by, ActorKind::User);
        store
            .execute_fenced::<Erasure, _>(
                &erasure_id.to_string(),
                command,
                &(),
                &metadata,
                Some(0),
                &fence,
            )
            .await
            .with_context(|| format!("erase in workspace {workspace}"))?;
        lines.push(format!(
            "erased {count} events of user {} in workspace {workspace} (erasure {erasure_id})",
            args.user
        ));
    }
    lines.push(
        "read models still hold what they projected: run `canopy rebuild all` to rebuild them \
         from the erased store"
            .to_owned(),
    );
    Ok(lines.join("\n"))
}

/// Rewrites the listed payloads to their tombstones in the erasure event's transaction (the
/// guard checks each against that event), drops the snapshots that may hold the erased fields,
/// and commits only if every listed event was rewritten.
struct Tombstones {
    event_ids: Vec<Uuid>,
}

impl Fence for Tombstones {
    async fn check(
        &self,
        conn: &mut PgConnection,
        _: &canopy_event_store::Committed,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query("SET LOCAL canopy.erasure = 'on'")
            .execute(&mut *conn)
            .await?;
        let rewritten = sqlx::query(
            "UPDATE events \
                SET payload = canopy_erasure_tombstone(event_type, event_version, payload), \
                    erased_at = now() \
              WHERE event_id = ANY($1) AND erased_at IS NULL",
        )
        .bind(&self.event_ids)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        sqlx::query("SET LOCAL canopy.erasure = 'off'")
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "DELETE FROM snapshots s USING events e \
              WHERE e.event_id = ANY($1) \
                AND s.aggregate_type = e.aggregate_type AND s.aggregate_id = e.aggregate_id",
        )
        .bind(&self.event_ids)
        .execute(&mut *conn)
        .await?;
        Ok(rewritten == self.event_ids.len() as u64)
    }
}

/// The records of an export file, for tests and tools: every event line.
pub fn read_events(file: &std::path::Path) -> Result<Vec<ChainRecord>> {
    let text = std::fs::read_to_string(file)?;
    let mut events = Vec::new();
    for line in text.lines() {
        if let Line::Event(record) = serde_json::from_str(line)? {
            events.push(*record);
        }
    }
    Ok(events)
}
