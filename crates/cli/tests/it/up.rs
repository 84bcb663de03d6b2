//! `canopy up` as a user runs it: the real binary, the whole product in one process, a prompt
//! followed on a live stream from submission to completion by the agent in its sandbox.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use canopy_auth::Claims;
use canopy_domain::Role;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const SECRET: &str = "canopy-up-test-secret-0123456789";
const WAIT: Duration = Duration::from_secs(120);

fn token(user: &str, role: Role) -> String {
    let claims = Claims::user(user, user, "w-up", role, chrono::Duration::hours(1));
    canopy_auth::mint_hs256(SECRET, &claims).unwrap()
}

/// Reads the printed URLs of command-api and query-api.
async fn urls(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> Result<(String, String)> {
    let (mut command, mut query) = (None, None);
    while let Some(line) = lines.next_line().await? {
        if let Some(url) = line.strip_prefix("command-api:") {
            command = Some(url.trim().to_owned());
        }
        if let Some(url) = line.strip_prefix("query-api:") {
            query = Some(url.trim().to_owned());
        }
        if line.contains("press Ctrl+C") {
            return Ok((
                command.context("command-api url")?,
                query.context("query-api url")?,
            ));
        }
    }
    bail!("canopy up ended before it was ready")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn canopy_up_runs_a_prompt_to_completion_and_streams_it_live() {
    let db = canopy_testkit::database().await.unwrap();
    let nats = canopy_testkit::nats().await.unwrap();
    let dir = tempfile::Builder::new()
        .prefix("canopy-up-test-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let source = dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("README.md"), "hello\n").unwrap();
    for args in [
        &["init", "-q", "-b", "main"][..],
        &["add", "README.md"],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@localhost",
            "commit",
            "-q",
            "-m",
            "initial",
        ],
    ] {
        assert!(
            std::process::Command::new("git")
                .args(args)
                .current_dir(&source)
                .status()
                .unwrap()
                .success()
        );
    }

    let mut up = tokio::process::Command::new(env!("CARGO_BIN_EXE_canopy"))
        .arg("up")
        .env("CANOPY_DATABASE_URL", &db.url)
        .env("CANOPY_NATS_URL", &nats.url)
        .env("CANOPY_STREAM_NAME", nats.prefix.to_uppercase())
        .env("CANOPY_SUBJECT_PREFIX", format!("{}.events", nats.prefix))
        .env(
            "CANOPY_PROJECTOR_CONSUMER_PREFIX",
            format!("{}-projector", nats.prefix),
        )
        .env("CANOPY_RUNNER_CONSUMER", format!("{}-runner", nats.prefix))
        .env("CANOPY_COMMAND_API_ADDR", "127.0.0.1:0")
        .env("CANOPY_QUERY_API_ADDR", "127.0.0.1:0")
        .env("CANOPY_RUNNER_ADDR", "127.0.0.1:0")
        .env("CANOPY_DATA_DIR", dir.path().join("data"))
        .env("CANOPY_JWT_SECRET", SECRET)
        .env("CANOPY_RUNNER_GIT_SCHEMES", "https,file")
        .env(
            "CANOPY_OPENCODE_BIN",
            canopy_opencode::opencode_binary().unwrap(),
        )
        .env_remove("CANOPY_MODEL_BASE_URL")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let (command, query) = tokio::time::timeout(WAIT, urls(&mut lines))
        .await
        .unwrap()
        .unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let http = reqwest::Client::new();
    let member = token("mia", Role::Member);
    let admin = token("ada", Role::Admin);
    let post = |path: String, who: String, body: Value| {
        let http = http.clone();
        let url = format!("{command}{path}");
        async move {
            let response = http
                .post(url)
                .bearer_auth(who)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            assert!(status.is_success(), "{status} {body}");
            body
        }
    };
    let session = post(
        "/sessions".into(),
        member.clone(),
        json!({ "title": "up", "repository_url": format!("file://{}", source.display()), "base_branch": "main" }),
    )
    .await["aggregate_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The live stream, as a browser would follow it.
    let response = http
        .get(format!("{query}/sessions/{session}/stream"))
        .bearer_auth(&member)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "live streams are on in canopy up");
    let mut stream = eventsource_stream::Eventsource::eventsource(response.bytes_stream());
    post(
        format!("/sessions/{session}/prompts"),
        member.clone(),
        json!({ "text": "Add a note" }),
    )
    .await;

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.contains(&"PromptCompleted".to_owned()) {
        let event = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no completion within {WAIT:?}; the stream showed {seen:?}"))
            .expect("the stream ended")
            .unwrap();
        let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
            continue;
        };
        let Some(event_type) = data["type"].as_str() else {
            continue;
        };
        seen.push(event_type.to_owned());
        match event_type {
            "PlanProposed" => {
                let plan = data["data"]["plan_id"].as_str().unwrap();
                post(
                    format!("/sessions/{session}/plans/{plan}/approve"),
                    admin.clone(),
                    json!({}),
                )
                .await;
            }
            "ToolApprovalRequested" => {
                let request = data["data"]["request_id"].as_str().unwrap();
                post(
                    format!("/sessions/{session}/tool-approvals/{request}/grant"),
                    admin.clone(),
                    json!({}),
                )
                .await;
            }
            "PromptFailed" => panic!("the prompt failed: {data}"),
            _ => {}
        }
    }
    let order = [
        "PromptSubmitted",
        "PromptStarted",
        "PlanProposed",
        "PlanApproved",
        "ToolExecuted",
        "CheckpointTaken",
        "PromptCompleted",
    ];
    let mut at = 0;
    for event_type in &seen {
        if at < order.len() && *event_type == order[at] {
            at += 1;
        }
    }
    assert_eq!(at, order.len(), "the stream showed {seen:?}");

    // SIGTERM: every part drains and the process exits 0.
    let pid = up.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), up.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "canopy up exited with {status}");
}
