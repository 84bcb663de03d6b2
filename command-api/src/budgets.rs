//! Budgets at the write side (`docs/budgets.md`): a prompt's admission, decided in the append's
//! transaction ([`Admission`], a [`Fence`]), and the 80% warning after recorded usage
//! ([`warn_after_usage`]).
//!
//! What was spent is the ledger (`budget_ledger`) that a trigger on `events` keeps in the
//! transaction of every `UsageRecorded`, so the numbers are the audit trail's numbers. A prompt's
//! cost is unknown until it runs, so each admitted, unfinished prompt reserves up to a
//! configured estimate of what is left (`budget_reservations`; its usage draws it down and its
//! end releases it). A prompt is admitted when every budget it draws on has something left
//! after what is spent and reserved. The admission locks the ledger rows it reads (workspace,
//! then person, then session, the order the usage trigger locks them in), so two admissions in
//! one workspace run one after the other: the second sees the first's reservation, and two
//! prompts that would together overspend cannot both pass. A workspace without spend budgets
//! skips all of this.

use std::sync::Mutex;

use canopy_domain::budget::BudgetKind;
use canopy_domain::session::{BudgetThresholdReached, SessionCommand};
use canopy_domain::{Actor, Session};
use canopy_event_store::{Committed, EventMetadata, ExecuteError, Fence};
use canopy_http::BudgetShortfall;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::AppState;

/// How budgets are applied (command-api's configuration).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BudgetSettings {
    /// The most of a cost budget one admitted prompt reserves, in micro-USD.
    pub(crate) reserve_cost_micro_usd: u64,
    /// The most of a token budget one admitted prompt reserves.
    pub(crate) reserve_tokens: u64,
    /// The share of a budget, in percent, whose use is recorded as `BudgetThresholdReached`.
    pub(crate) warn_percent: u8,
}

/// The index that records each budget warning once (`migrations/20261207200000_budgets.sql`).
const THRESHOLD_ONCE: &str = "events_budget_threshold_once";

/// Admits a prompt when every budget it draws on has something left; reserves its estimate.
pub(crate) struct Admission<'a> {
    pub(crate) settings: &'a BudgetSettings,
    pub(crate) workspace_id: &'a str,
    pub(crate) person_id: &'a str,
    pub(crate) session_id: Uuid,
    pub(crate) prompt_id: Uuid,
    /// Why the fence refused, for the answer.
    pub(crate) refusal: Mutex<Option<BudgetShortfall>>,
}

/// One budget as it stands for one scope and period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Standing {
    pub(crate) kind: BudgetKind,
    pub(crate) scope: String,
    pub(crate) period: String,
    pub(crate) limit: u64,
    pub(crate) spent: u64,
    pub(crate) reserved: u64,
}

impl Standing {
    pub(crate) fn remaining(&self) -> u64 {
        self.limit
            .saturating_sub(self.spent.saturating_add(self.reserved))
    }

    fn shortfall(&self) -> BudgetShortfall {
        BudgetShortfall {
            budget: self.kind.as_str().to_owned(),
            scope: self.scope.clone(),
            period: self.period.clone(),
            unit: self.kind.unit().to_owned(),
            limit: self.limit,
            spent: self.spent,
            reserved: self.reserved,
            remaining: self.remaining(),
        }
    }
}

/// A ledger row: `(scope, period, cost, tokens, agent_ms)`.
type LedgerRow = (String, String, i64, i64, i64);

/// Locks (creating them if need be) the ledger rows of the workspace's month, the person's day
/// and the session, in that order, and returns them in that order.
const LOCK_LEDGER: &str = "INSERT INTO budget_ledger AS l (workspace_id, scope, period)
     VALUES ($1, 'workspace', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM')),
            ($1, 'person:' || $2, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
            ($1, 'session:' || $3, '')
     ON CONFLICT (workspace_id, scope, period) DO UPDATE SET tokens = l.tokens
     RETURNING scope, period, cost_micro_usd, tokens, agent_ms";

/// What admitted, unfinished prompts hold back, per scope: `(workspace cost, workspace tokens,
/// person cost, session cost, session tokens)`.
const RESERVED: &str = "SELECT
       COALESCE(sum(GREATEST(cost_micro_usd - used_cost, 0)) FILTER (WHERE month = $2), 0)::bigint,
       COALESCE(sum(GREATEST(tokens - used_tokens, 0)) FILTER (WHERE month = $2), 0)::bigint,
       COALESCE(sum(GREATEST(cost_micro_usd - used_cost, 0))
                    FILTER (WHERE person_id = $3 AND day = $4), 0)::bigint,
       COALESCE(sum(GREATEST(cost_micro_usd - used_cost, 0)) FILTER (WHERE session_id = $5), 0)::bigint,
       COALESCE(sum(GREATEST(tokens - used_tokens, 0)) FILTER (WHERE session_id = $5), 0)::bigint
     FROM budget_reservations WHERE workspace_id = $1";

/// The limits set for a workspace.
pub(crate) async fn limits(
    conn: &mut PgConnection,
    workspace_id: &str,
) -> Result<Vec<(BudgetKind, u64)>, sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as(r#"SELECT kind, "limit" FROM budget_limits WHERE workspace_id = $1"#)
            .bind(workspace_id)
            .fetch_all(conn)
            .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(kind, limit)| Some((BudgetKind::parse(&kind)?, to_u64(limit))))
        .collect())
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The budgets a prompt of `person` in `session` draws on, as they stand. Locks the ledger rows.
async fn standings(
    conn: &mut PgConnection,
    workspace_id: &str,
    person_id: &str,
    session_id: Uuid,
) -> Result<(Vec<Standing>, String, String), sqlx::Error> {
    let rows: Vec<LedgerRow> = sqlx::query_as(LOCK_LEDGER)
        .bind(workspace_id)
        .bind(person_id)
        .bind(session_id.to_string())
        .fetch_all(&mut *conn)
        .await?;
    let [workspace, person, session] = rows.as_slice() else {
        return Err(sqlx::Error::Protocol(
            "the ledger lock returned no 3 rows".into(),
        ));
    };
    let (month, day) = (workspace.1.clone(), person.1.clone());
    let reserved: (i64, i64, i64, i64, i64) = sqlx::query_as(RESERVED)
        .bind(workspace_id)
        .bind(&month)
        .bind(person_id)
        .bind(&day)
        .bind(session_id)
        .fetch_one(&mut *conn)
        .await?;
    let mut standings = Vec::new();
    for (kind, limit) in limits(conn, workspace_id).await? {
        let (row, spent, reserved) = match kind {
            BudgetKind::WorkspaceMonthlyCost => (workspace, workspace.2, reserved.0),
            BudgetKind::WorkspaceMonthlyTokens => (workspace, workspace.3, reserved.1),
            BudgetKind::PersonDailyCost => (person, person.2, reserved.2),
            BudgetKind::SessionCost => (session, session.2, reserved.3),
            BudgetKind::SessionTokens => (session, session.3, reserved.4),
            // whole seconds the session's prompts ran; nothing to reserve
            BudgetKind::SessionAgentSeconds => (session, session.4 / 1000, 0),
            // held by the runner's lease take, not by admission
            BudgetKind::ConcurrentSessions => continue,
        };
        standings.push(Standing {
            kind,
            scope: row.0.clone(),
            period: row.1.clone(),
            limit,
            spent: to_u64(spent),
            reserved: to_u64(reserved),
        });
    }
    Ok((standings, month, day))
}

impl Fence for Admission<'_> {
    async fn check(&self, conn: &mut PgConnection, _: &Committed) -> Result<bool, sqlx::Error> {
        // A workspace without spend budgets takes no lock and reserves nothing, so its prompts
        // do not serialize on its ledger row (a budget set later counts usage from then on).
        let spend_limited = limits(conn, self.workspace_id)
            .await?
            .iter()
            .any(|(kind, _)| *kind != BudgetKind::ConcurrentSessions);
        if !spend_limited {
            return Ok(true);
        }
        let (standings, month, day) =
            standings(conn, self.workspace_id, self.person_id, self.session_id).await?;
        if let Some(spent) = standings.iter().find(|s| s.remaining() == 0) {
            *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(spent.shortfall());
            return Ok(false);
        }
        // reserve the estimate, or what is left of the tightest budget when that is less
        let left = |kinds: &[BudgetKind]| {
            standings
                .iter()
                .filter(|s| kinds.contains(&s.kind))
                .map(Standing::remaining)
                .min()
                .unwrap_or(u64::MAX)
        };
        let cost = self.settings.reserve_cost_micro_usd.min(left(&[
            BudgetKind::WorkspaceMonthlyCost,
            BudgetKind::PersonDailyCost,
            BudgetKind::SessionCost,
        ]));
        let tokens = self.settings.reserve_tokens.min(left(&[
            BudgetKind::WorkspaceMonthlyTokens,
            BudgetKind::SessionTokens,
        ]));
        sqlx::query(
            "INSERT INTO budget_reservations
                    (session_id, prompt_id, workspace_id, person_id, month, day, cost_micro_usd, tokens)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(self.session_id)
        .bind(self.prompt_id)
        .bind(self.workspace_id)
        .bind(self.person_id)
        .bind(month)
        .bind(day)
        .bind(to_i64(cost))
        .bind(to_i64(tokens))
        .execute(conn)
        .await?;
        Ok(true)
    }
}

/// After usage of `prompt_id` was recorded: records `BudgetThresholdReached` on the session for
/// every budget the usage drew on that is now at or past the warning share. Each is recorded
/// once (the unique index decides; a duplicate means someone recorded it first). Not in the
/// usage's own transaction (one append is one aggregate's): a crash in between leaves the
/// warning to the session's next usage report. Failures are logged, never the report's.
pub(crate) async fn warn_after_usage(
    state: &AppState,
    actor: Actor,
    metadata: &EventMetadata,
    session_id: Uuid,
    prompt_id: Uuid,
) {
    if let Err(error) = warn(state, actor, metadata, session_id, prompt_id).await {
        tracing::warn!(%error, %session_id, "could not check the session's budgets for a warning");
    }
}

async fn warn(
    state: &AppState,
    actor: Actor,
    metadata: &EventMetadata,
    session_id: Uuid,
    prompt_id: Uuid,
) -> anyhow::Result<()> {
    let mut conn = state.pool.acquire().await?;
    let who: Option<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT s.payload #>> '{SessionStarted,workspace_id}',
                (SELECT p.payload #>> '{PromptSubmitted,author_id}' FROM events p
                  WHERE p.aggregate_type = 'session' AND p.aggregate_id = s.aggregate_id
                    AND p.event_type = 'PromptSubmitted'
                    AND p.payload #>> '{PromptSubmitted,prompt_id}' = $2)
           FROM events s
          WHERE s.aggregate_type = 'session' AND s.aggregate_id = $1 AND s.sequence = 1",
    )
    .bind(session_id.to_string())
    .bind(prompt_id.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    let Some((Some(workspace_id), author)) = who else {
        return Ok(());
    };
    let limits = limits(&mut conn, &workspace_id).await?;
    if limits.is_empty() {
        return Ok(());
    }
    let person = format!("person:{}", author.unwrap_or_default());
    let session = format!("session:{session_id}");
    let rows: Vec<LedgerRow> = sqlx::query_as(
        "SELECT scope, period, cost_micro_usd, tokens, agent_ms FROM budget_ledger
          WHERE workspace_id = $1
            AND ((scope = 'workspace' AND period = to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM'))
              OR (scope = $2 AND period = to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD'))
              OR (scope = $3 AND period = ''))",
    )
    .bind(&workspace_id)
    .bind(&person)
    .bind(&session)
    .fetch_all(&mut *conn)
    .await?;
    drop(conn);
    let row = |scope: &str| rows.iter().find(|r| r.0 == scope);
    for (kind, limit) in limits {
        let (scope, spent): (&str, fn(&LedgerRow) -> i64) = match kind {
            BudgetKind::WorkspaceMonthlyCost => ("workspace", |r: &LedgerRow| r.2),
            BudgetKind::WorkspaceMonthlyTokens => ("workspace", |r: &LedgerRow| r.3),
            BudgetKind::PersonDailyCost => (person.as_str(), |r: &LedgerRow| r.2),
            BudgetKind::SessionCost => (session.as_str(), |r: &LedgerRow| r.2),
            BudgetKind::SessionTokens => (session.as_str(), |r: &LedgerRow| r.3),
            BudgetKind::SessionAgentSeconds | BudgetKind::ConcurrentSessions => continue,
        };
        let Some(row) = row(scope) else { continue };
        let spent = to_u64(spent(row));
        if u128::from(spent) * 100 < u128::from(limit) * u128::from(state.budgets.warn_percent) {
            continue;
        }
        let command = SessionCommand::RecordBudgetThreshold {
            actor: actor.clone(),
            threshold: BudgetThresholdReached {
                workspace_id: workspace_id.clone(),
                budget: kind,
                scope: row.0.clone(),
                period: row.1.clone(),
                percent: state.budgets.warn_percent,
                limit,
                spent,
            },
        };
        let result = state
            .store
            .execute::<Session>(
                &session_id.to_string(),
                command,
                &state.session_policy,
                metadata,
                None,
            )
            .await;
        match result {
            Ok(_) => {
                metrics::counter!("canopy_budget_warnings_total", "budget" => kind.as_str())
                    .increment(1);
            }
            Err(ExecuteError::Duplicate { index }) if index == THRESHOLD_ONCE => {}
            Err(error) => anyhow::bail!("recording the warning of {kind}: {error}"),
        }
    }
    Ok(())
}
