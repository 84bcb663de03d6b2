//! `canopy demo`: one whole session against a running stack (`canopy up`), printed live.
//!
//! It makes a small repository with a bare remote, then, as four people of one workspace: two
//! members start a session and queue prompts, a viewer's prompt is refused, the agent proposes a
//! plan, a member's approval is refused and an admin approves, the agent's tools run (its command
//! asks for approval, which the admin grants), each prompt ends in a checkpoint, and the admin
//! pushes the session branch to the bare remote. Every event of the session's live stream is
//! printed as it arrives; the demo ends with where to look next.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use canopy_auth::Claims;
use canopy_domain::Role;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::say;

/// Where the demo runs.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// command-api's base URL.
    #[arg(
        long,
        env = "CANOPY_COMMAND_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub command_api: String,
    /// query-api's base URL.
    #[arg(
        long,
        env = "CANOPY_QUERY_API_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub query_api: String,
    /// HS256 secret shared with the APIs (the demo mints its people's tokens).
    #[command(flatten)]
    pub secret: canopy_config::JwtSecretArgs,
    /// Where the demo's repository and remote are made.
    #[arg(long, default_value = ".canopy/demo")]
    pub dir: PathBuf,
    /// The longest wait for one step (250ms, 30s, 5m, 2h, 1d; a bare number is seconds).
    #[arg(long, value_parser = canopy_config::parse_duration, default_value = "3m")]
    pub step_timeout: Duration,
}

const WORKSPACE: &str = "demo-workspace";

struct Person {
    name: &'static str,
    token: String,
}

impl Person {
    fn new(id: &str, name: &'static str, role: Role, secret: &str) -> Result<Self> {
        let mut claims = Claims::user(id, name, WORKSPACE, role, chrono::Duration::hours(2));
        claims.email = Some(format!("{id}@example.com"));
        Ok(Self {
            name,
            token: canopy_auth::mint_hs256(secret, &claims)?,
        })
    }
}

struct Demo {
    args: DemoArgs,
    http: reqwest::Client,
    events: mpsc::UnboundedReceiver<Value>,
    session: String,
}

/// Runs the demo; returns the last line it prints.
pub(crate) async fn run(args: DemoArgs) -> Result<String> {
    let remote = make_repository(&args.dir)?;
    say(&format!(
        "repository:   {} (bare: the session clones it, and its branch is pushed back to it)",
        remote.display()
    ))?;
    let secret = args.secret.jwt_secret.clone();
    let ann = Person::new("ann", "Ann (member)", Role::Member, &secret)?;
    let bo = Person::new("bo", "Bo (member)", Role::Member, &secret)?;
    let vic = Person::new("vic", "Vic (viewer)", Role::Viewer, &secret)?;
    let ada = Person::new("ada", "Ada (admin)", Role::Admin, &secret)?;
    let http = reqwest::Client::new();

    let started = post(
        &http,
        &args.command_api,
        &ann,
        "/sessions",
        json!({
            "title": "Canopy demo",
            "repository_url": format!("file://{}", remote.display()),
            "base_branch": "main",
        }),
    )
    .await
    .context("start a session: is the stack running (canopy up)?")?;
    let session = started["aggregate_id"]
        .as_str()
        .context("the session id")?
        .to_owned();
    say(&format!("{} started session {session}", ann.name))?;
    let events = follow(&http, &args.query_api, &ann, &session).await?;
    let mut demo = Demo {
        args,
        http,
        events,
        session,
    };
    let s = demo.session.clone();

    demo.post(&bo, &format!("/sessions/{s}/join"), json!({}))
        .await?;
    demo.post(
        &ann,
        &format!("/sessions/{s}/prompts"),
        json!({ "text": "Add a short note about this demo" }),
    )
    .await?;
    demo.post(
        &bo,
        &format!("/sessions/{s}/prompts"),
        json!({ "text": "Then list what is in the repository" }),
    )
    .await?;
    demo.refused(
        &vic,
        &format!("/sessions/{s}/prompts"),
        json!({ "text": "Viewers may not prompt" }),
    )
    .await?;

    for round in 1..=2 {
        let plan = demo.wait_for("PlanProposed").await?;
        let plan_id = plan["data"]["plan_id"]
            .as_str()
            .context("plan id")?
            .to_owned();
        if round == 1 {
            demo.refused(
                &bo,
                &format!("/sessions/{s}/plans/{plan_id}/approve"),
                json!({}),
            )
            .await?;
        }
        demo.post(
            &ada,
            &format!("/sessions/{s}/plans/{plan_id}/approve"),
            json!({}),
        )
        .await?;
        let ask = demo.wait_for("ToolApprovalRequested").await?;
        let request = ask["data"]["request_id"]
            .as_str()
            .context("request id")?
            .to_owned();
        demo.post(
            &ada,
            &format!("/sessions/{s}/tool-approvals/{request}/grant"),
            json!({}),
        )
        .await?;
        demo.wait_for("CheckpointTaken").await?;
        demo.wait_for("PromptCompleted").await?;
    }
    demo.post(&ada, &format!("/sessions/{s}/pushes"), json!({}))
        .await?;
    let pushed = demo.wait_for("BranchPushed").await?;
    let branch = pushed["data"]["branch"].as_str().context("branch")?;
    let sha = git(&remote, &["rev-parse", &format!("refs/heads/{branch}")])?;
    say(&format!("the remote has {branch} at {sha}"))?;

    let (command, query) = (&demo.args.command_api, &demo.args.query_api);
    say("where to look:")?;
    say(&format!("  API docs:   {command}/docs/ and {query}/docs/"))?;
    say(&format!(
        "  timeline:   {query}/sessions/{s}/timeline (bearer: a token of workspace {WORKSPACE})"
    ))?;
    say(&format!(
        "  analytics:  {query}/analytics/tools and {query}/analytics/agent-time"
    ))?;
    say(&format!(
        "  the branch: git -C {} log {branch}",
        remote.display()
    ))?;
    Ok("demo done".to_owned())
}

impl Demo {
    async fn post(&self, who: &Person, path: &str, body: Value) -> Result<Value> {
        let answer = post(&self.http, &self.args.command_api, who, path, body).await?;
        say(&format!("> {} POST {path}: ok", who.name))?;
        Ok(answer)
    }

    /// A request the demo expects to be refused; prints the refusal.
    async fn refused(&self, who: &Person, path: &str, body: Value) -> Result<()> {
        let response = self
            .http
            .post(format!("{}{path}", self.args.command_api))
            .bearer_auth(&who.token)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let problem: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            bail!(
                "{} POST {path} was accepted; it should have been refused",
                who.name
            );
        }
        say(&format!(
            "> {} POST {path}: refused, {} {}",
            who.name,
            status.as_u16(),
            problem["code"].as_str().unwrap_or_default()
        ))
    }

    /// Waits for the next event of `event_type` on the stream (the printer shows them all).
    async fn wait_for(&mut self, event_type: &str) -> Result<Value> {
        let wait = self.args.step_timeout;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .map_err(|_| anyhow::anyhow!("no {event_type} within {wait:?}"))?
                .context("the live stream ended")?;
            match event["type"].as_str() {
                Some(t) if t == event_type => return Ok(event),
                Some("PromptFailed") => bail!("a prompt failed: {}", event["data"]["reason"]),
                _ => {}
            }
        }
    }
}

async fn post(
    http: &reqwest::Client,
    base: &str,
    who: &Person,
    path: &str,
    body: Value,
) -> Result<Value> {
    let response = http
        .post(format!("{base}{path}"))
        .bearer_auth(&who.token)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {base}{path}"))?;
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{} POST {path}: {status} {answer}", who.name);
    }
    Ok(answer)
}

/// Prints the session's live stream as it arrives and hands each event on.
async fn follow(
    http: &reqwest::Client,
    query: &str,
    who: &Person,
    session: &str,
) -> Result<mpsc::UnboundedReceiver<Value>> {
    let response = http
        .get(format!("{query}/sessions/{session}/stream"))
        .bearer_auth(&who.token)
        .send()
        .await
        .context("open the live stream")?;
    if !response.status().is_success() {
        bail!("the live stream answered {}", response.status());
    }
    let (events, receiver) = mpsc::unbounded_channel();
    let mut stream = eventsource_stream::Eventsource::eventsource(response.bytes_stream());
    tokio::spawn(async move {
        while let Some(Ok(event)) = stream.next().await {
            let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
                continue;
            };
            if let Some(event_type) = data["type"].as_str() {
                let _ = say(&format!(
                    "  live #{:<3} {event_type:<22} {}",
                    data["sequence"],
                    describe(&data["data"])
                ));
                if events.send(data).is_err() {
                    return;
                }
            }
        }
    });
    Ok(receiver)
}

/// A one-line gist of an event's payload.
fn describe(data: &Value) -> String {
    let field = |name: &str| data[name].as_str().map(str::to_owned);
    let text = field("summary")
        .or_else(|| field("text"))
        .or_else(|| {
            field("input_summary").map(|input| {
                format!(
                    "{} `{input}` {}",
                    data["tool"].as_str().unwrap_or_default(),
                    data["status"].as_str().unwrap_or_default()
                )
            })
        })
        .or_else(|| field("commit_sha").map(|sha| format!("{sha} {}", data["files_changed"])))
        .or_else(|| field("reason"))
        .or_else(|| field("name"))
        .unwrap_or_default();
    let line = text.lines().next().unwrap_or_default();
    let mut short: String = line.chars().take(90).collect();
    if line.chars().nth(90).is_some() {
        short.push('…');
    }
    short
}

/// A bare repository with one commit on `main`, readable by sandbox users.
fn make_repository(dir: &Path) -> Result<PathBuf> {
    let mut dir = std::path::absolute(dir)?;
    if canopy_local_servers::is_root() && !canopy_local_servers::reachable_by_others(&dir) {
        dir = canopy_local_servers::reachable_home("demo", &dir);
    }
    let run_id = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
    let dir = dir.join(run_id);
    let source = dir.join("source");
    std::fs::create_dir_all(&source)?;
    std::fs::write(source.join("README.md"), "# A Canopy demo repository\n")?;
    git(&source, &["init", "-q", "-b", "main"])?;
    git(&source, &["add", "README.md"])?;
    git(
        &source,
        &[
            "-c",
            "user.name=Canopy demo",
            "-c",
            "user.email=demo@example.com",
            "commit",
            "-q",
            "-m",
            "initial",
        ],
    )?;
    let remote = dir.join("remote.git");
    git(&dir, &["clone", "-q", "--bare", "source", "remote.git"])?;
    let status = Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(&dir)
        .status()?;
    if !status.success() {
        bail!("chmod the demo repository");
    }
    Ok(remote)
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .context("run git")?;
    if !output.status.success() {
        bail!(
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
