//! The workspace's budgets as a running prompt sees them (`docs/budgets.md`): what is left of
//! every budget the prompt draws on, read from the ledger command-api's appends keep
//! (`budget_limits`, `budget_ledger`). A turn starts with the model proxy's ceiling set from the
//! tokens left and its agent-time limit from the session's seconds left, and re-reads the
//! budgets after each usage it records: a spent budget stops the turn like the agent-time limit
//! does (abort, checkpoint of what was done, `PromptFailed` with a `budget_exhausted:` reason).

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

/// The reason's prefix for a prompt a budget stopped.
pub const EXHAUSTED: &str = "budget_exhausted";

/// One budget the prompt draws on, as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub kind: String,
    pub scope: String,
    pub limit: u64,
    pub spent: u64,
}

impl Standing {
    fn left(&self) -> u64 {
        self.limit.saturating_sub(self.spent)
    }

    fn unit(&self) -> &'static str {
        canopy_domain::BudgetKind::parse(&self.kind)
            .map(canopy_domain::BudgetKind::unit)
            .unwrap_or("")
    }
}

/// The budgets `prompt` of `session` draws on: the workspace's month, the author's day and the
/// session, each with its limit and what the ledger says is spent (agent time in seconds).
pub async fn standings(
    pool: &PgPool,
    session: Uuid,
    prompt: Uuid,
) -> Result<Vec<Standing>, sqlx::Error> {
    let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
        r#"WITH s AS (
             SELECT e.payload #>> '{SessionStarted,workspace_id}' AS ws,
                    (SELECT p.payload #>> '{PromptSubmitted,author_id}' FROM events p
                      WHERE p.aggregate_type = 'session' AND p.aggregate_id = e.aggregate_id
                        AND p.event_type = 'PromptSubmitted'
                        AND p.payload #>> '{PromptSubmitted,prompt_id}' = $2) AS author
               FROM events e
              WHERE e.aggregate_type = 'session' AND e.aggregate_id = $1 AND e.sequence = 1),
           scoped AS (
             SELECT b.kind, b."limit",
                    CASE WHEN b.kind LIKE 'workspace_%' THEN 'workspace'
                         WHEN b.kind LIKE 'person_%' THEN 'person:' || COALESCE(s.author, '')
                         ELSE 'session:' || $1 END AS scope,
                    CASE WHEN b.kind LIKE 'workspace_%' THEN to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM')
                         WHEN b.kind LIKE 'person_%' THEN to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD')
                         ELSE '' END AS period,
                    s.ws
               FROM s JOIN budget_limits b ON b.workspace_id = s.ws
              WHERE b.kind <> 'concurrent_sessions')
         SELECT c.kind, c.scope, c."limit",
                COALESCE(CASE WHEN c.kind LIKE '%_cost' THEN l.cost_micro_usd
                              WHEN c.kind LIKE '%_tokens' THEN l.tokens
                              ELSE l.agent_ms / 1000 END, 0)::bigint
           FROM scoped c
           LEFT JOIN budget_ledger l
             ON l.workspace_id = c.ws AND l.scope = c.scope AND l.period = c.period
          ORDER BY c.kind"#,
    )
    .bind(session.to_string())
    .bind(prompt.to_string())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(kind, scope, limit, spent)| Standing {
            kind,
            scope,
            limit: u64::try_from(limit).unwrap_or(0),
            spent: u64::try_from(spent).unwrap_or(0),
        })
        .collect())
}

/// Why the prompt must stop, when a budget it draws on is spent. The session's agent seconds
/// count `running` (this turn's agent time, not in the ledger until the prompt ends) too.
pub fn exhausted(standings: &[Standing], running: Duration) -> Option<String> {
    standings.iter().find_map(|s| {
        let spent = if s.kind == "session_agent_seconds" {
            s.spent.saturating_add(running.as_secs())
        } else {
            s.spent
        };
        (spent >= s.limit).then(|| {
            format!(
                "{EXHAUSTED}: the {} budget ({}) is spent: {spent} of {} {}",
                s.kind,
                s.scope,
                s.limit,
                s.unit()
            )
        })
    })
}

/// The tokens the token budgets leave the session, if any limits them.
pub fn tokens_left(standings: &[Standing]) -> Option<u64> {
    standings
        .iter()
        .filter(|s| s.kind.ends_with("_tokens"))
        .map(Standing::left)
        .min()
}

/// The agent time the session's budget leaves, if one is set.
pub fn agent_time_left(standings: &[Standing]) -> Option<Duration> {
    standings
        .iter()
        .find(|s| s.kind == "session_agent_seconds")
        .map(|s| Duration::from_secs(s.left()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(kind: &str, limit: u64, spent: u64) -> Standing {
        Standing {
            kind: kind.into(),
            scope: "session:s".into(),
            limit,
            spent,
        }
    }

    #[test]
    fn a_budget_is_exhausted_at_its_limit_and_agent_time_counts_the_running_turn() {
        let budgets = [
            standing("session_tokens", 1000, 999),
            standing("session_agent_seconds", 60, 50),
        ];
        assert_eq!(exhausted(&budgets, Duration::from_secs(9)), None);
        let reason = exhausted(&budgets, Duration::from_secs(10)).unwrap();
        assert!(
            reason.starts_with("budget_exhausted: the session_agent_seconds"),
            "{reason}"
        );
        let spent = [standing("session_tokens", 1000, 1000)];
        assert!(
            exhausted(&spent, Duration::ZERO)
                .unwrap()
                .contains("1000 of 1000 tokens")
        );
    }

    #[test]
    fn what_is_left_is_the_tightest_budget() {
        let budgets = [
            standing("session_tokens", 1000, 900),
            standing("workspace_monthly_tokens", 10_000, 9_950),
            standing("session_cost", 5, 0),
        ];
        assert_eq!(tokens_left(&budgets), Some(50));
        assert_eq!(agent_time_left(&budgets), None);
        assert_eq!(tokens_left(&[]), None);
    }
}
