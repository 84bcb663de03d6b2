//! Delivery: per-endpoint workers that POST the outbox in order, with retries.
//!
//! The scheduler looks for endpoints (active, not suspended) whose oldest pending delivery is
//! due, when the consumer queued something, when a worker ends, and every `poll`. It runs at
//! most `concurrency` workers, one per endpoint. A worker holds its endpoint with a
//! transaction-scoped advisory lock (another process skips it; a killed process's lock goes
//! with its connection) and delivers the endpoint's pending rows oldest first until none is
//! due: an attempt that fails schedules the next one (`retry_schedule`) and the rows behind it
//! wait, so an endpoint sees its events in relay order.
//!
//! Each attempt checks the target again (the name may resolve elsewhere now) and connects to
//! the address it checked, follows no redirect, reads at most [`MAX_RESPONSE_BYTES`] of the
//! answer and gives up after `request_timeout`. It is recorded in `webhook_attempts` (status
//! code or error, latency) with the delivery's new state in one transaction; an attempt cut by
//! a crash or shutdown is not recorded and is made again with the same `webhook-id`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canopy_webhook::{Resolver, TargetPolicy, check_target, sign};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::DeliverySettings;
use crate::body::{self, Links};

/// The most of an endpoint's answer that is read (and then dropped).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The most of an error kept in the attempt log.
const MAX_ERROR_CHARS: usize = 500;

/// Delivers the outbox.
#[derive(Debug)]
pub struct Deliverer {
    pool: PgPool,
    settings: Arc<DeliverySettings>,
    policy: TargetPolicy,
    resolver: Arc<dyn Resolver>,
    links: Links,
}

/// How long a worker signs with the secrets it read before reading them again (a rotation
/// keeps the previous secret valid far longer).
const SECRETS_FOR: Duration = Duration::from_secs(10);

/// The secrets a worker signs with, and when it read them.
#[derive(Debug, Default)]
struct Secrets {
    secrets: Vec<String>,
    read_at: Option<Instant>,
}

/// The oldest pending delivery of an endpoint.
#[derive(Debug, sqlx::FromRow)]
struct Head {
    event_id: Uuid,
    message_id: String,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    series: i32,
    attempts: i32,
    next_attempt_at: DateTime<Utc>,
    url: String,
    deliverable: bool,
}

/// What one attempt gave.
#[derive(Debug)]
struct Outcome {
    status_code: Option<u16>,
    error: Option<String>,
    latency: Duration,
}

impl Outcome {
    fn delivered(&self) -> bool {
        self.error.is_none()
    }

    fn failed(error: impl std::fmt::Display, started: Instant) -> Self {
        let mut error = error.to_string();
        if error.chars().count() > MAX_ERROR_CHARS {
            error = error.chars().take(MAX_ERROR_CHARS).collect();
        }
        Self {
            status_code: None,
            error: Some(error),
            latency: started.elapsed(),
        }
    }
}

impl Deliverer {
    pub fn new(
        pool: PgPool,
        settings: Arc<DeliverySettings>,
        policy: TargetPolicy,
        resolver: Arc<dyn Resolver>,
    ) -> Self {
        let links = Links {
            query_api_url: settings.query_api_url.clone(),
            command_api_url: settings.command_api_url.clone(),
        };
        Self {
            pool,
            settings,
            policy,
            resolver,
            links,
        }
    }

    /// Endpoints whose oldest pending delivery is due.
    async fn due_endpoints(&self) -> Result<Vec<Uuid>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT s.webhook_id FROM webhook_subscriptions s
              WHERE s.status = 'active' AND s.suspended_at IS NULL
                AND (SELECT d.next_attempt_at FROM webhook_deliveries d
                      WHERE d.webhook_id = s.webhook_id AND d.status = 'pending'
                      ORDER BY d.transaction_id, d.position LIMIT 1) <= now()",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Delivers `webhook_id`'s due rows, oldest first, while this process holds the endpoint.
    async fn drain(
        &self,
        webhook_id: Uuid,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), sqlx::Error> {
        let mut hold = self.pool.begin().await?;
        // the holding transaction is idle while requests run, however long they take: the
        // pool's idle-in-transaction limit must not end it (a dead process's ends with its
        // connection)
        sqlx::query("SET LOCAL idle_in_transaction_session_timeout = 0")
            .execute(&mut *hold)
            .await?;
        let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(lock_key(webhook_id))
            .fetch_one(&mut *hold)
            .await?;
        if !held {
            return Ok(());
        }
        let mut client: Option<((String, SocketAddr), reqwest::Client)> = None;
        let mut secrets = Secrets::default();
        loop {
            if *stop.borrow() {
                break;
            }
            let Some(head) = self.head(webhook_id).await? else {
                break;
            };
            if !head.deliverable || head.next_attempt_at > Utc::now() {
                break;
            }
            let outcome = tokio::select! {
                outcome = self.attempt(webhook_id, &head, &mut client, &mut secrets) => outcome?,
                // abandoned, not recorded: made again later with the same webhook-id
                _ = stop.changed() => break,
            };
            self.record(webhook_id, &head, &outcome).await?;
        }
        hold.rollback().await
    }

    async fn head(&self, webhook_id: Uuid) -> Result<Option<Head>, sqlx::Error> {
        sqlx::query_as(
            "SELECT d.event_id, d.message_id, d.aggregate_type, d.aggregate_id, d.sequence,
                    d.series, d.attempts, d.next_attempt_at, s.url,
                    (s.status = 'active' AND s.suspended_at IS NULL) AS deliverable
               FROM webhook_deliveries d JOIN webhook_subscriptions s USING (webhook_id)
              WHERE d.webhook_id = $1 AND d.status = 'pending'
              ORDER BY d.transaction_id, d.position LIMIT 1",
        )
        .bind(webhook_id)
        .fetch_optional(&self.pool)
        .await
    }

    /// The secrets to sign with: the current one, and those it replaced less than
    /// `secret_grace` ago.
    async fn secrets(&self, webhook_id: Uuid) -> Result<Vec<String>, sqlx::Error> {
        let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT secret, created_at FROM webhook_secrets WHERE webhook_id = $1
              ORDER BY version DESC",
        )
        .bind(webhook_id)
        .fetch_all(&self.pool)
        .await?;
        let grace =
            chrono::Duration::from_std(self.settings.secret_grace).unwrap_or(chrono::Duration::MAX);
        let now = Utc::now();
        let mut secrets = Vec::new();
        let mut replaced_at: Option<DateTime<Utc>> = None;
        for (secret, created_at) in rows {
            if replaced_at.is_some_and(|at| now - at > grace) {
                break;
            }
            secrets.push(secret);
            replaced_at = Some(created_at);
        }
        Ok(secrets)
    }

    async fn attempt(
        &self,
        webhook_id: Uuid,
        head: &Head,
        client: &mut Option<((String, SocketAddr), reqwest::Client)>,
        secrets: &mut Secrets,
    ) -> Result<Outcome, sqlx::Error> {
        let started = Instant::now();
        let body = {
            let mut conn = self.pool.acquire().await?;
            body::build(
                &mut conn,
                &self.links,
                &head.aggregate_type,
                &head.aggregate_id,
                head.sequence,
            )
            .await?
        };
        let Some(body) = body else {
            return Ok(Outcome::failed("the event is not in the store", started));
        };
        if secrets.read_at.is_none_or(|at| at.elapsed() > SECRETS_FOR) {
            secrets.secrets = self.secrets(webhook_id).await?;
            secrets.read_at = Some(Instant::now());
        }
        let secrets = &secrets.secrets;
        if secrets.is_empty() {
            return Ok(Outcome::failed("no signing secret", started));
        }
        let target = match check_target(&head.url, self.policy, self.resolver.as_ref()).await {
            Ok(target) => target,
            Err(error) => {
                metrics::counter!("canopy_webhooks_targets_refused_total").increment(1);
                return Ok(Outcome::failed(format!("target refused: {error}"), started));
            }
        };
        let key = (target.host.clone(), target.addr);
        let client = match client {
            Some((cached, client)) if *cached == key => client.clone(),
            _ => {
                let built = match self.client(&target) {
                    Ok(built) => built,
                    Err(error) => return Ok(Outcome::failed(error, started)),
                };
                *client = Some((key, built.clone()));
                built
            }
        };
        let timestamp = Utc::now().timestamp();
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let signature = sign(&refs, &head.message_id, timestamp, &body);
        let sent = client
            .post(target.url.clone())
            .header("webhook-id", &head.message_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .header("content-type", "application/json")
            .header("user-agent", "canopy-webhooks")
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(error) => return Ok(Outcome::failed(error, started)),
        };
        let status = response.status();
        // a bounded read of the answer, within the request's time limit
        let mut read = 0;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    read += chunk.len();
                    if read >= MAX_RESPONSE_BYTES {
                        break;
                    }
                }
                Ok(None) => break,
                Err(error) if status.is_success() => {
                    return Ok(Outcome::failed(error, started));
                }
                Err(_) => break,
            }
        }
        let latency = started.elapsed();
        Ok(Outcome {
            status_code: Some(status.as_u16()),
            error: (!status.is_success()).then(|| format!("answered {status}")),
            latency,
        })
    }

    /// A client that connects only to the checked address, follows no redirect and ignores
    /// proxy settings (a proxy would resolve the name again).
    fn client(
        &self,
        target: &canopy_webhook::CheckedTarget,
    ) -> Result<reqwest::Client, reqwest::Error> {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(self.settings.request_timeout)
            .connect_timeout(self.settings.request_timeout)
            .resolve(&target.host, target.addr)
            .build()
    }

    /// Records the attempt and the delivery's new state in one transaction.
    async fn record(
        &self,
        webhook_id: Uuid,
        head: &Head,
        outcome: &Outcome,
    ) -> Result<(), sqlx::Error> {
        let attempt = head.attempts + 1;
        let schedule = &self.settings.retry_schedule;
        let (state, next) = if outcome.delivered() {
            ("delivered", None)
        } else if attempt as usize > schedule.len() {
            ("dead", None)
        } else {
            let wait = schedule[attempt as usize - 1];
            let wait = chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
            ("pending", Some(Utc::now() + wait))
        };
        let logged = match state {
            "delivered" => "delivered",
            "dead" => "dead",
            _ => "failed",
        };
        let latency_ms = i32::try_from(outcome.latency.as_millis()).unwrap_or(i32::MAX);
        // one statement: the attempt, the delivery's new state and the endpoint's dead-letter
        // streak (suspended at `suspend_after`) commit together
        sqlx::query(
            "WITH logged AS (
                 INSERT INTO webhook_attempts (webhook_id, event_id, series, attempt, status_code,
                                               latency_ms, error, outcome)
                 VALUES ($1, $2, $3, $5, $7, $9, $8, $10)),
             delivery AS (
                 UPDATE webhook_deliveries
                    SET status = $4, attempts = $5,
                        next_attempt_at = COALESCE($6, next_attempt_at),
                        delivered_at = CASE WHEN $4 = 'delivered' THEN now() END,
                        last_status_code = $7, last_error = $8
                  WHERE webhook_id = $1 AND event_id = $2 AND series = $3
                    AND status = 'pending')
             UPDATE webhook_subscriptions
                SET dead_streak = CASE WHEN $4 = 'dead' THEN dead_streak + 1 ELSE 0 END,
                    suspended_at = CASE WHEN $4 = 'dead' AND dead_streak + 1 >= $11
                                        THEN now() ELSE suspended_at END,
                    suspended_reason = CASE WHEN $4 = 'dead' AND dead_streak + 1 >= $11
                        THEN 'deliveries dead-lettered ' || (dead_streak + 1) || ' times in a row'
                        ELSE suspended_reason END
              WHERE webhook_id = $1
                AND ($4 = 'dead' OR ($4 = 'delivered' AND dead_streak <> 0))",
        )
        .bind(webhook_id)
        .bind(head.event_id)
        .bind(head.series)
        .bind(state)
        .bind(attempt)
        .bind(next)
        .bind(outcome.status_code.map(i32::from))
        .bind(outcome.error.as_deref())
        .bind(latency_ms)
        .bind(logged)
        .bind(i32::try_from(self.settings.suspend_after).unwrap_or(i32::MAX))
        .execute(&self.pool)
        .await?;
        metrics::counter!("canopy_webhooks_attempts_total", "outcome" => logged).increment(1);
        metrics::histogram!("canopy_webhooks_attempt_seconds")
            .record(outcome.latency.as_secs_f64());
        Ok(())
    }
}

/// The advisory lock key of an endpoint.
fn lock_key(webhook_id: Uuid) -> i64 {
    let bytes = webhook_id.as_bytes();
    let mut high = [0u8; 8];
    high.copy_from_slice(&bytes[..8]);
    // a namespace of its own, apart from the relay's and the projectors' keys
    i64::from_be_bytes(high) ^ 0x5745_4248_4f4f_4b53
}

/// Runs workers until `stop`.
pub(crate) async fn run(
    deliverer: Deliverer,
    wake: Arc<tokio::sync::Notify>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let deliverer = Arc::new(deliverer);
    let permits = Arc::new(tokio::sync::Semaphore::new(
        deliverer.settings.concurrency as usize,
    ));
    let busy: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let mut workers = tokio::task::JoinSet::new();
    loop {
        while workers.try_join_next().is_some() {}
        match deliverer.due_endpoints().await {
            Ok(due) => {
                for webhook_id in due {
                    if !busy
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(webhook_id)
                    {
                        continue;
                    }
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        busy.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&webhook_id);
                        break;
                    };
                    let deliverer = deliverer.clone();
                    let busy = busy.clone();
                    let mut stop = stop.clone();
                    workers.spawn(async move {
                        if let Err(error) = deliverer.drain(webhook_id, &mut stop).await {
                            tracing::warn!(%error, %webhook_id, "webhook worker failed");
                        }
                        busy.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&webhook_id);
                        drop(permit);
                    });
                }
            }
            Err(error) => tracing::warn!(%error, "could not look for due webhook deliveries"),
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(deliverer.settings.poll) => {}
            Some(_) = workers.join_next(), if !workers.is_empty() => {}
        }
    }
    while workers.join_next().await.is_some() {}
}
