//! `canopy bench-client`: the load of one bench row, run in its own process.
//!
//! The orchestrator (`canopy bench`) starts one of these per row with a [`Job`] as JSON and
//! reads one [`Measured`] as JSON from its stdout, so no load is generated (or measured) inside
//! the measured stack. Every worker owns its connection (HTTP keep-alive, a PostgreSQL
//! connection or the NATS client) made before the clock starts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// One row's load.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Job {
    /// One single-row INSERT of an event per transaction into `table`.
    Insert {
        database_url: String,
        table: String,
        connections: usize,
        seconds: f64,
    },
    /// The statements one command issues (claim the key, load snapshot and tail, append and
    /// complete the key in one transaction), each connection on its own session.
    CommandSql {
        database_url: String,
        connections: usize,
        seconds: f64,
    },
    /// JetStream acked publishes of the event payload, `in_flight` at a time.
    Publish {
        nats_url: String,
        in_flight: usize,
        seconds: f64,
    },
    /// submit-prompt through command-api; request `i` of client `w` goes to session
    /// `(w + i * clients) % sessions`.
    Submit {
        command_api: String,
        token: String,
        sessions: Vec<String>,
        clients: usize,
        seconds: f64,
    },
    /// `pairs` submit-then-cancel pairs on one session over `clients` connections (the session
    /// grows by two events a pair); the latencies are the submits'.
    Pairs {
        command_api: String,
        token: String,
        session: String,
        pairs: usize,
        clients: usize,
    },
    /// GET `url` over `connections` keep-alive connections.
    Get {
        url: String,
        token: String,
        connections: usize,
        seconds: f64,
    },
    /// The SELECT behind a read endpoint, issued directly.
    Select {
        database_url: String,
        sql: String,
        binds: Vec<Bind>,
        connections: usize,
        seconds: f64,
    },
    /// One client submits `count` prompts one at a time and times each until it is published
    /// on JetStream, delivered on the session's SSE stream and readable from query-api.
    Lag {
        command_api: String,
        query_api: String,
        nats_url: String,
        subject_prefix: String,
        token: String,
        session: String,
        count: usize,
    },
}

impl Job {
    /// The job's kind, for messages (a job's URLs may carry credentials).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Insert { .. } => "insert",
            Self::CommandSql { .. } => "command_sql",
            Self::Publish { .. } => "publish",
            Self::Submit { .. } => "submit",
            Self::Pairs { .. } => "pairs",
            Self::Get { .. } => "get",
            Self::Select { .. } => "select",
            Self::Lag { .. } => "lag",
        }
    }
}

/// A typed bind parameter of a [`Job::Select`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Bind {
    Text(String),
    Uuid(Uuid),
}

/// What a job measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Measured {
    /// Operations that succeeded.
    pub ops: u64,
    /// Operations that failed (not in the latencies).
    pub errors: u64,
    /// Wall time of the measured part.
    pub seconds: f64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Further figures of the job (the lag job's percentiles per stage).
    #[serde(default)]
    pub extra: BTreeMap<String, f64>,
}

/// The event payload every write row uses (scripts/bench/insert_event.sql's).
pub(crate) const PAYLOAD: &str = r#"{"PromptSubmitted":{"prompt_id":"8f0c1c9e-6a43-4a8e-9a55-2f0b1f7f6f11","author_id":"u-member","author_name":"member person","author_email":null,"text":"add a test for the login race please"}}"#;
const METADATA: &str = r#"{"actor_id":"u1","actor_name":"Ada","actor_kind":"user","correlation_id":"c0a1","request_id":"r0a1"}"#;
const PROMPT_TEXT: &str = "add a test for the login race please";

/// Runs the job given as JSON and prints what it measured as JSON.
pub(crate) async fn run(job: &str) -> Result<String> {
    let job: Job = serde_json::from_str(job).context("parse the job")?;
    let measured = execute(job).await?;
    Ok(serde_json::to_string(&measured)?)
}

async fn execute(job: Job) -> Result<Measured> {
    match job {
        Job::Insert {
            database_url,
            table,
            connections,
            seconds,
        } => insert(&database_url, &table, connections, seconds).await,
        Job::CommandSql {
            database_url,
            connections,
            seconds,
        } => command_sql(&database_url, connections, seconds).await,
        Job::Publish {
            nats_url,
            in_flight,
            seconds,
        } => publish(&nats_url, in_flight, seconds).await,
        Job::Submit {
            command_api,
            token,
            sessions,
            clients,
            seconds,
        } => submit(&command_api, &token, &sessions, clients, seconds).await,
        Job::Pairs {
            command_api,
            token,
            session,
            pairs,
            clients,
        } => prompt_pairs(&command_api, &token, &session, pairs, clients).await,
        Job::Get {
            url,
            token,
            connections,
            seconds,
        } => get(&url, &token, connections, seconds).await,
        Job::Select {
            database_url,
            sql,
            binds,
            connections,
            seconds,
        } => select(&database_url, &sql, &binds, connections, seconds).await,
        Job::Lag {
            command_api,
            query_api,
            nats_url,
            subject_prefix,
            token,
            session,
            count,
        } => {
            lag(LagJob {
                command_api,
                query_api,
                nats_url,
                subject_prefix,
                token,
                session,
                count,
            })
            .await
        }
    }
}

/// One worker's latencies and failures.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn record<T, E: std::fmt::Display>(&mut self, started: Instant, result: Result<T, E>) {
        match result {
            Ok(_) => self.latencies.push(started.elapsed()),
            Err(error) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(error.to_string());
                }
            }
        }
    }
}

/// Sorted percentile in milliseconds (0 when there is nothing).
fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let index = ((q * sorted.len() as f64) as usize).min(sorted.len() - 1);
    sorted[index].as_secs_f64() * 1000.0
}

#[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn summarize(tallies: Vec<Tally>, elapsed: Duration) -> Result<Measured> {
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for tally in tallies {
        latencies.extend(tally.latencies);
        errors += tally.errors;
        first_error = first_error.or(tally.first_error);
    }
    if let Some(error) = &first_error {
        tracing::warn!(errors, first = %error, "some operations failed");
    }
    if latencies.is_empty() {
        bail!(
            "no operation succeeded ({errors} failed; first: {})",
            first_error.unwrap_or_default()
        );
    }
    latencies.sort_unstable();
    let seconds = elapsed.as_secs_f64();
    Ok(Measured {
        ops: latencies.len() as u64,
        errors,
        seconds,
        per_second: latencies.len() as f64 / seconds.max(1e-9),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        extra: BTreeMap::new(),
    })
}

/// Runs `workers` (each already connected) until `seconds` have passed, then summarizes.
async fn timed<F>(workers: Vec<F>) -> Result<Measured>
where
    F: Future<Output = Tally> + Send + 'static,
{
    let started = Instant::now();
    let tasks: Vec<_> = workers.into_iter().map(tokio::spawn).collect();
    let mut tallies = Vec::new();
    for task in tasks {
        tallies.push(task.await.context("a load worker panicked")?);
    }
    summarize(tallies, started.elapsed())
}

fn deadline(seconds: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(seconds)
}

async fn connections(database_url: &str, count: usize) -> Result<Vec<PgConnection>> {
    let mut all = Vec::with_capacity(count);
    for _ in 0..count {
        all.push(
            PgConnection::connect(database_url)
                .await
                .context("connect to the database")?,
        );
    }
    Ok(all)
}

async fn insert(database_url: &str, table: &str, count: usize, seconds: f64) -> Result<Measured> {
    let sql = format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('session', $1, 1, 'PromptSubmitted', '1', $2::jsonb, $3::jsonb)"
    );
    let connected = connections(database_url, count).await?;
    let end = deadline(seconds);
    let workers = connected
        .into_iter()
        .map(|mut connection| {
            let sql = sql.clone();
            async move {
                let mut tally = Tally::default();
                while Instant::now() < end {
                    let started = Instant::now();
                    let result = sqlx::query(&sql)
                        .bind(Uuid::new_v4().to_string())
                        .bind(PAYLOAD)
                        .bind(METADATA)
                        .execute(&mut connection)
                        .await;
                    tally.record(started, result);
                }
                tally
            }
        })
        .collect();
    timed(workers).await
}

/// A snapshot the size a session's compact state has (a few KB).
fn snapshot_payload() -> String {
    let prompts: Vec<_> = (0..32)
        .map(|i| serde_json::json!({"prompt_id": Uuid::new_v4(), "status": "completed", "n": i}))
        .collect();
    serde_json::json!({"shape": 2, "finished": prompts, "pad": "x".repeat(2048)}).to_string()
}

async fn command_sql(database_url: &str, count: usize, seconds: f64) -> Result<Measured> {
    let mut prepared = Vec::new();
    for mut connection in connections(database_url, count).await? {
        let session = Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload) \
             VALUES ('session', $1, 0, 0, $2::jsonb)",
        )
        .bind(&session)
        .bind(snapshot_payload())
        .execute(&mut connection)
        .await
        .context("write the baseline's snapshot")?;
        prepared.push((connection, session));
    }
    let end = deadline(seconds);
    let workers = prepared
        .into_iter()
        .map(|(mut connection, session)| async move {
            let mut tally = Tally::default();
            let mut version = 0_i64;
            while Instant::now() < end {
                let started = Instant::now();
                let result = one_command(&mut connection, &session, version).await;
                if result.is_ok() {
                    version += 1;
                }
                tally.record(started, result);
            }
            tally
        })
        .collect();
    timed(workers).await
}

/// command-api's statements for one submit-prompt with an Idempotency-Key (command-api
/// `idempotency::claim`, the store's load of snapshot and tail, its `INSERT … unnest` and the
/// key's completion in the append's transaction).
async fn one_command(
    connection: &mut PgConnection,
    session: &str,
    version: i64,
) -> Result<(), sqlx::Error> {
    let key = Uuid::new_v4().to_string();
    sqlx::query(
        "INSERT INTO idempotency_keys (caller, key, request_hash, state, claim_token, locked_until, expires_at) \
         VALUES ($1, $2, $3, 'in_flight', $4, now() + interval '10 seconds', now() + interval '24 hours') \
         ON CONFLICT (caller, key) DO UPDATE SET state = 'in_flight' \
          WHERE idempotency_keys.expires_at < now() RETURNING true",
    )
    .bind("bench:bench")
    .bind(&key)
    .bind(vec![7_u8; 32])
    .bind(Uuid::new_v4())
    .fetch_optional(&mut *connection)
    .await?;
    sqlx::query(
        "SELECT last_sequence, payload FROM snapshots WHERE aggregate_type = 'session' AND aggregate_id = $1",
    )
    .bind(session)
    .fetch_optional(&mut *connection)
    .await?;
    sqlx::query(
        "SELECT sequence, event_type, event_version, payload, metadata FROM events \
         WHERE aggregate_type = 'session' AND aggregate_id = $1 AND sequence > $2 ORDER BY sequence",
    )
    .bind(session)
    .bind(version)
    .fetch_all(&mut *connection)
    .await?;
    let mut tx = connection.begin().await?;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT 'session', $1, e.sequence, e.event_type, e.event_version, e.payload, $6::jsonb \
         FROM unnest($2::bigint[], $3::text[], $4::text[], $5::jsonb[]) AS e(sequence, event_type, event_version, payload) \
         ORDER BY e.sequence RETURNING event_id, position, sequence",
    )
    .bind(session)
    .bind(vec![version + 1])
    .bind(vec!["PromptSubmitted".to_owned()])
    .bind(vec!["1".to_owned()])
    .bind(vec![serde_json::json!({"PromptSubmitted": {
        "prompt_id": Uuid::new_v4(),
        "author_id": "u-member",
        "author_name": "member person",
        "author_email": null,
        "text": PROMPT_TEXT,
    }})])
    .bind(METADATA)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE idempotency_keys SET state = 'completed', response_status = 202, response_body = $3::jsonb \
         WHERE caller = $1 AND key = $2 AND state = 'in_flight'",
    )
    .bind("bench:bench")
    .bind(&key)
    .bind(r#"{"aggregate_type":"session","version":1}"#)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

async fn publish(nats_url: &str, in_flight: usize, seconds: f64) -> Result<Measured> {
    let client = canopy_config::connect_nats(nats_url, "canopy-bench", Duration::from_secs(10))
        .await
        .context("connect to NATS")?;
    let jetstream = async_nats::jetstream::new(client);
    let name = format!("CANOPY_BENCH_{}", Uuid::new_v4().simple());
    let subject = format!("canopy-bench-{}", Uuid::new_v4().simple());
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{subject}.>")],
            ..Default::default()
        })
        .await
        .context("create the bench stream")?;
    let end = deadline(seconds);
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut pending = futures::stream::FuturesUnordered::new();
    let mut sent = 0_u64;
    while Instant::now() < end || !pending.is_empty() {
        while Instant::now() < end && pending.len() < in_flight.max(1) {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", Uuid::new_v4().to_string().as_str());
            let at = Instant::now();
            let ack = jetstream
                .publish_with_headers(format!("{subject}.{sent}"), headers, PAYLOAD.into())
                .await;
            sent += 1;
            match ack {
                Ok(ack) => pending.push(async move { (at, ack.await) }),
                Err(error) => tally.record::<(), _>(at, Err(error)),
            }
        }
        if let Some((at, result)) = pending.next().await {
            tally.record(at, result);
        }
    }
    let elapsed = started.elapsed();
    jetstream
        .delete_stream(&name)
        .await
        .context("delete the bench stream")?;
    summarize(vec![tally], elapsed)
}

fn http_client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(60))
        .build()?)
}

/// POSTs `body` and returns the answer's JSON, or the status and body as an error.
async fn post(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    let response = http
        .post(url)
        .bearer_auth(token)
        .header("Idempotency-Key", Uuid::new_v4().to_string())
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!(
            "{url}: {status} {}",
            text.chars().take(300).collect::<String>()
        );
    }
    Ok(serde_json::from_str(&text).unwrap_or_default())
}

async fn submit(
    command_api: &str,
    token: &str,
    sessions: &[String],
    clients: usize,
    seconds: f64,
) -> Result<Measured> {
    let end = deadline(seconds);
    let mut workers = Vec::new();
    for worker in 0..clients {
        let http = http_client()?;
        let (base, token, sessions) = (command_api.to_owned(), token.to_owned(), sessions.to_vec());
        workers.push(async move {
            let mut tally = Tally::default();
            let mut i = 0;
            while Instant::now() < end {
                let session = &sessions[(worker + i * clients) % sessions.len()];
                i += 1;
                let started = Instant::now();
                let result = post(
                    &http,
                    &format!("{base}/sessions/{session}/prompts"),
                    &token,
                    serde_json::json!({"text": PROMPT_TEXT}),
                )
                .await;
                tally.record(started, result);
            }
            tally
        });
    }
    timed(workers).await
}

async fn prompt_pairs(
    command_api: &str,
    token: &str,
    session: &str,
    pairs: usize,
    clients: usize,
) -> Result<Measured> {
    let clients = clients.clamp(1, pairs.max(1));
    let mut workers = Vec::new();
    for worker in 0..clients {
        let http = http_client()?;
        let (base, token, session) = (command_api.to_owned(), token.to_owned(), session.to_owned());
        let mine = pairs / clients + usize::from(worker < pairs % clients);
        workers.push(async move {
            let mut tally = Tally::default();
            for _ in 0..mine {
                let started = Instant::now();
                let submitted = post(
                    &http,
                    &format!("{base}/sessions/{session}/prompts"),
                    &token,
                    serde_json::json!({"text": PROMPT_TEXT}),
                )
                .await;
                let latency = started.elapsed();
                let cancelled = match &submitted {
                    Ok(answer) => {
                        let prompt = answer["id"].as_str().unwrap_or_default();
                        post(
                            &http,
                            &format!("{base}/sessions/{session}/prompts/{prompt}/cancel"),
                            &token,
                            serde_json::json!({}),
                        )
                        .await
                    }
                    Err(error) => Err(anyhow::anyhow!("{error:#}")),
                };
                match cancelled {
                    Ok(_) => tally.latencies.push(latency),
                    Err(error) => tally.record::<(), _>(started, Err(error)),
                }
            }
            tally
        });
    }
    timed(workers).await
}

async fn get(url: &str, token: &str, count: usize, seconds: f64) -> Result<Measured> {
    let mut clients = Vec::new();
    for _ in 0..count {
        let http = http_client()?;
        // connect before the clock starts
        http.get(url)
            .bearer_auth(token)
            .send()
            .await?
            .bytes()
            .await?;
        clients.push(http);
    }
    let end = deadline(seconds);
    let workers = clients
        .into_iter()
        .map(|http| {
            let (url, token) = (url.to_owned(), token.to_owned());
            async move {
                let mut tally = Tally::default();
                while Instant::now() < end {
                    let started = Instant::now();
                    let result = async {
                        let response = http.get(&url).bearer_auth(&token).send().await?;
                        let status = response.status();
                        response.bytes().await?;
                        if !status.is_success() {
                            bail!("{url}: {status}");
                        }
                        Ok(())
                    }
                    .await;
                    tally.record(started, result);
                }
                tally
            }
        })
        .collect();
    timed(workers).await
}

async fn select(
    database_url: &str,
    sql: &str,
    binds: &[Bind],
    count: usize,
    seconds: f64,
) -> Result<Measured> {
    let connected = connections(database_url, count).await?;
    let end = deadline(seconds);
    let workers = connected
        .into_iter()
        .map(|mut connection| {
            let (sql, binds) = (sql.to_owned(), binds.to_vec());
            async move {
                let mut tally = Tally::default();
                while Instant::now() < end {
                    let started = Instant::now();
                    let mut query = sqlx::query(&sql);
                    for bind in &binds {
                        query = match bind {
                            Bind::Text(text) => query.bind(text.clone()),
                            Bind::Uuid(id) => query.bind(*id),
                        };
                    }
                    let result = query.fetch_all(&mut connection).await;
                    tally.record(started, result);
                }
                tally
            }
        })
        .collect();
    timed(workers).await
}

struct LagJob {
    command_api: String,
    query_api: String,
    nats_url: String,
    subject_prefix: String,
    token: String,
    session: String,
    count: usize,
}

/// Forwards the arrival time of every message whose text names something to `sink`.
type Arrivals = tokio::sync::mpsc::UnboundedReceiver<(Instant, String)>;

async fn wait_for(arrivals: &mut Arrivals, prompt: &str) -> Result<Instant> {
    let wait = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some((at, text)) = arrivals.recv().await {
            if text.contains(prompt) {
                return Some(at);
            }
        }
        None
    });
    wait.await
        .context("no delivery within 30 s")?
        .context("the subscription ended")
}

async fn lag(job: LagJob) -> Result<Measured> {
    let http = http_client()?;
    let nats = canopy_config::connect_nats(&job.nats_url, "canopy-bench", Duration::from_secs(10))
        .await
        .context("connect to NATS")?;
    let mut subscription = nats
        .subscribe(format!("{}.session.{}.>", job.subject_prefix, job.session))
        .await?;
    let (nats_tx, mut published) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = subscription.next().await {
            let text = String::from_utf8_lossy(&message.payload).into_owned();
            if nats_tx.send((Instant::now(), text)).is_err() {
                break;
            }
        }
    });
    let response = http_client()?
        .get(format!("{}/sessions/{}/stream", job.query_api, job.session))
        .bearer_auth(&job.token)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("the session's stream answered {}", response.status());
    }
    let (sse_tx, mut delivered) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut events = eventsource_stream::Eventsource::eventsource(response.bytes_stream());
        while let Some(Ok(event)) = events.next().await {
            if sse_tx.send((Instant::now(), event.data)).is_err() {
                break;
            }
        }
    });
    let (mut command, mut publish, mut sse, mut project) = (
        Tally::default(),
        Tally::default(),
        Tally::default(),
        Tally::default(),
    );
    let started = Instant::now();
    for _ in 0..job.count {
        let sent = Instant::now();
        let answer = post(
            &http,
            &format!("{}/sessions/{}/prompts", job.command_api, job.session),
            &job.token,
            serde_json::json!({"text": PROMPT_TEXT}),
        )
        .await?;
        command.latencies.push(sent.elapsed());
        let prompt = answer["id"].as_str().unwrap_or_default().to_owned();
        let projected = async {
            loop {
                let response = http
                    .get(format!("{}/prompts/{prompt}", job.query_api))
                    .bearer_auth(&job.token)
                    .send()
                    .await?;
                let ok = response.status().is_success();
                response.bytes().await?;
                if ok {
                    return anyhow::Ok(Instant::now());
                }
                if sent.elapsed() > Duration::from_secs(30) {
                    bail!("the prompt was not readable within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let (on_stream, on_sse, readable) = tokio::join!(
            wait_for(&mut published, &prompt),
            wait_for(&mut delivered, &prompt),
            projected
        );
        publish.latencies.push(on_stream? - sent);
        sse.latencies.push(on_sse? - sent);
        project.latencies.push(readable? - sent);
        post(
            &http,
            &format!(
                "{}/sessions/{}/prompts/{prompt}/cancel",
                job.command_api, job.session
            ),
            &job.token,
            serde_json::json!({}),
        )
        .await?;
    }
    let elapsed = started.elapsed();
    let mut measured = summarize(vec![command], elapsed)?;
    for (name, tally) in [("publish", publish), ("sse", sse), ("projection", project)] {
        let stage = summarize(vec![tally], elapsed)?;
        measured
            .extra
            .insert(format!("{name}_p50_ms"), stage.p50_ms);
        measured
            .extra
            .insert(format!("{name}_p99_ms"), stage.p99_ms);
    }
    Ok(measured)
}
