//! What a driver knows about its session, read from the event store (never from the stream).
//!
//! The domain's own `Session` aggregate is folded from the same events, so the runner decides
//! on exactly the state command-api will check its reports against; beside it the view keeps
//! what the aggregate does not (prompt texts, plan texts and verdicts, checkpoint commits, the
//! people's requests, and which requests this runner has already served, known from the
//! idempotency keys of the runner's own events). [`SessionView::refresh`] reads only the events
//! after the last one seen, so a driver that is woken up often reads little.

use std::collections::{BTreeMap, HashMap, HashSet};

use canopy_domain::{Session, SessionEvent};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use sqlx::PgPool;
use uuid::Uuid;

/// A prompt as submitted.
#[derive(Debug, Clone)]
pub struct PromptInfo {
    pub author_id: String,
    pub author_name: String,
    pub author_email: Option<String>,
    pub text: String,
}

/// A plan the agent proposed and what people said of it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanInfo {
    pub plan_id: Uuid,
    pub prompt_id: Uuid,
    pub summary: String,
    pub steps: Vec<String>,
    pub proposed_at: DateTime<Utc>,
    pub verdict: Option<Verdict>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub approved: bool,
    pub reviewer_name: String,
    pub comment: Option<String>,
}

/// A tool approval request and its answer.
#[derive(Debug, Clone)]
pub struct ApprovalInfo {
    pub requested_at: DateTime<Utc>,
    pub verdict: Option<Verdict>,
}

/// Something a person asked the runner to do outside a prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Checkpoint {
        requested_by: String,
        label: Option<String>,
    },
    Restore {
        checkpoint_id: Uuid,
    },
    Push {
        branch: String,
    },
}

/// The session as the runner sees it.
#[derive(Debug, Default)]
pub struct SessionView {
    pub session_id: Uuid,
    pub last_sequence: i64,
    pub session: Session,
    pub prompts: HashMap<Uuid, PromptInfo>,
    /// In the order proposed.
    pub plans: Vec<PlanInfo>,
    pub approvals: HashMap<Uuid, ApprovalInfo>,
    pub checkpoint_commits: HashMap<Uuid, String>,
    /// People's requests by the sequence of their event.
    pub requests: BTreeMap<i64, Request>,
    /// Requests the runner has recorded an answer to.
    pub served: HashSet<i64>,
    /// The sequence of the `SandboxStarted` of the sandbox the session says is running.
    pub sandbox_started_at: Option<i64>,
    /// The OpenCode session of the last sandbox, kept after it stopped so it can be resumed.
    pub last_opencode_session: Option<String>,
}

/// The idempotency-key prefix of the runner's answer to the request recorded at `sequence`.
pub fn request_key(sequence: i64, what: &str) -> String {
    format!("req:{sequence}:{what}")
}

impl SessionView {
    pub fn new(session_id: Uuid) -> Self {
        Self {
            session_id,
            ..Self::default()
        }
    }

    /// Reads the events after the last one seen. Returns how many were new.
    pub async fn refresh(&mut self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        type Row = (
            i64,
            String,
            String,
            serde_json::Value,
            serde_json::Value,
            DateTime<Utc>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT sequence, event_type, event_version, payload, metadata, recorded_at FROM events
                  WHERE aggregate_type = 'session' AND aggregate_id = $1 AND sequence > $2
                  ORDER BY sequence",
        )
        .bind(self.session_id.to_string())
        .bind(self.last_sequence)
        .fetch_all(pool)
        .await?;
        let count = rows.len();
        for (sequence, event_type, version, payload, metadata, recorded_at) in rows {
            match canopy_domain::upcast::decode_session_event(&event_type, &version, payload) {
                Ok(event) => self.apply(sequence, event, &metadata, recorded_at),
                Err(error) => {
                    tracing::error!(%error, session = %self.session_id, sequence, "an event the runner cannot read")
                }
            }
            self.last_sequence = sequence;
        }
        Ok(count)
    }

    fn apply(
        &mut self,
        sequence: i64,
        event: SessionEvent,
        metadata: &serde_json::Value,
        at: DateTime<Utc>,
    ) {
        if let Some(served) = metadata["idempotency_key"]
            .as_str()
            .and_then(|key| key.strip_prefix("req:"))
            .and_then(|rest| rest.split(':').next())
            .and_then(|seq| seq.parse::<i64>().ok())
        {
            self.served.insert(served);
        }
        match &event {
            SessionEvent::PromptSubmitted(e) => {
                self.prompts.insert(
                    e.prompt_id,
                    PromptInfo {
                        author_id: e.author_id.clone(),
                        author_name: e.author_name.clone(),
                        author_email: e.author_email.clone(),
                        text: e.text.clone(),
                    },
                );
            }
            SessionEvent::PlanProposed(e) => self.plans.push(PlanInfo {
                plan_id: e.plan_id,
                prompt_id: e.prompt_id,
                summary: e.summary.clone(),
                steps: e.steps.clone(),
                proposed_at: at,
                verdict: None,
            }),
            SessionEvent::PlanApproved(e) => self.decide_plan(
                e.plan_id,
                Verdict {
                    approved: true,
                    reviewer_name: e.reviewer_name.clone(),
                    comment: None,
                },
            ),
            SessionEvent::PlanRejected(e) => self.decide_plan(
                e.plan_id,
                Verdict {
                    approved: false,
                    reviewer_name: e.reviewer_name.clone(),
                    comment: Some(e.comment.clone()),
                },
            ),
            SessionEvent::ToolApprovalRequested(e) => {
                self.approvals.insert(
                    e.request_id,
                    ApprovalInfo {
                        requested_at: at,
                        verdict: None,
                    },
                );
            }
            SessionEvent::ToolApprovalGranted(e) => {
                if let Some(approval) = self.approvals.get_mut(&e.request_id) {
                    approval.verdict = Some(Verdict {
                        approved: true,
                        reviewer_name: e.reviewer_name.clone(),
                        comment: None,
                    });
                }
            }
            SessionEvent::ToolApprovalDenied(e) => {
                if let Some(approval) = self.approvals.get_mut(&e.request_id) {
                    approval.verdict = Some(Verdict {
                        approved: false,
                        reviewer_name: e.reviewer_name.clone(),
                        comment: e.comment.clone(),
                    });
                }
            }
            SessionEvent::CheckpointTaken(e) => {
                self.checkpoint_commits
                    .insert(e.checkpoint_id, e.commit_sha.clone());
            }
            SessionEvent::CheckpointRequested(e) => {
                self.requests.insert(
                    sequence,
                    Request::Checkpoint {
                        requested_by: e.requested_by.clone(),
                        label: e.label.clone(),
                    },
                );
            }
            SessionEvent::RestoreRequested(e) => {
                self.requests.insert(
                    sequence,
                    Request::Restore {
                        checkpoint_id: e.checkpoint_id,
                    },
                );
            }
            SessionEvent::PushRequested(e) => {
                self.requests.insert(
                    sequence,
                    Request::Push {
                        branch: e.branch.clone(),
                    },
                );
            }
            SessionEvent::SandboxStarted(e) => {
                self.sandbox_started_at = Some(sequence);
                self.last_opencode_session = Some(e.opencode_session_id.clone());
            }
            SessionEvent::SandboxStopped(_) => self.sandbox_started_at = None,
            _ => {}
        }
        self.session.apply(event);
    }

    fn decide_plan(&mut self, plan_id: Uuid, verdict: Verdict) {
        if let Some(plan) = self.plans.iter_mut().find(|p| p.plan_id == plan_id) {
            plan.verdict = Some(verdict);
        }
    }

    /// The plans of a prompt, oldest first.
    pub fn plans_of(&self, prompt_id: Uuid) -> impl Iterator<Item = &PlanInfo> {
        self.plans.iter().filter(move |p| p.prompt_id == prompt_id)
    }

    /// The first request not served yet.
    pub fn next_request(&self) -> Option<(i64, &Request)> {
        self.requests
            .iter()
            .find(|(sequence, _)| !self.served.contains(sequence))
            .map(|(sequence, request)| (*sequence, request))
    }

    /// Whether the prompt is still the running one.
    pub fn is_running(&self, prompt_id: Uuid) -> bool {
        self.session.running_prompt() == Some(prompt_id)
    }

    /// A participant's display name, or their id.
    pub fn name_of(&self, user_id: &str) -> String {
        self.session
            .participant(user_id)
            .map(|p| p.name.clone())
            .unwrap_or_else(|| user_id.to_owned())
    }
}

/// What a feature's other sessions have taught: the text the agent gets with every prompt.
#[derive(Debug, Default, Clone)]
pub struct FeatureContext {
    pub title: String,
    pub description: String,
    pub learnings: Vec<String>,
    pub decisions: Vec<String>,
}

/// Reads a feature's learnings and decisions (the most recent `limit` of each).
pub async fn feature_context(
    pool: &PgPool,
    feature_id: Uuid,
    limit: usize,
) -> Result<FeatureContext, sqlx::Error> {
    use canopy_domain::FeatureEvent;
    let rows: Vec<(serde_json::Value,)> = sqlx::query_as(
        "SELECT payload FROM events WHERE aggregate_type = 'feature' AND aggregate_id = $1
          ORDER BY sequence",
    )
    .bind(feature_id.to_string())
    .fetch_all(pool)
    .await?;
    let mut context = FeatureContext::default();
    for (payload,) in rows {
        match serde_json::from_value::<FeatureEvent>(payload) {
            Ok(FeatureEvent::FeatureCreated(e)) => {
                context.title = e.title;
                context.description = e.description;
            }
            Ok(FeatureEvent::LearningShared(e)) => {
                context
                    .learnings
                    .push(format!("{} (from {})", e.text, e.shared_by_name));
            }
            Ok(FeatureEvent::DecisionRecorded(e)) => {
                context
                    .decisions
                    .push(format!("{}: {}", e.title, e.rationale));
            }
            Ok(_) => {}
            Err(error) => {
                tracing::error!(%error, %feature_id, "a feature event the runner cannot read")
            }
        }
    }
    let keep_last = |items: &mut Vec<String>| {
        if items.len() > limit {
            items.drain(..items.len() - limit);
        }
    };
    keep_last(&mut context.learnings);
    keep_last(&mut context.decisions);
    Ok(context)
}
