//! The product as a user runs it: `canopy up` with nothing configured, `canopy demo` against it,
//! a live stream watched from outside, Ctrl+C, and nothing left behind.

mod bench;
mod cluster;
mod config;
mod faults;
mod stack;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use canopy_auth::Claims;
use canopy_domain::Role;
use futures::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(240);

/// The `canopy` binary of this build (`target/<profile>/canopy`, beside `deps/`).
fn canopy() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let binary = dir.join("canopy");
    assert!(
        binary.exists(),
        "build it first: cargo build -p canopy ({binary:?})"
    );
    binary
}

/// Processes whose command line names `dir` (the stack's servers and sandboxes live there).
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if cmdline.contains(&needle) && !zombie {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn canopy_up_then_canopy_demo_shows_every_step_live_and_ctrl_c_leaves_nothing() {
    let dir = tempfile::Builder::new()
        .prefix("canopy-e2e-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let data = dir.path().join("data");
    let free = || canopy_local_servers::free_port().unwrap().to_string();
    let (pg, nats, command_port, query_port) = (free(), free(), free(), free());
    let command_api = format!("http://127.0.0.1:{command_port}");
    let query_api = format!("http://127.0.0.1:{query_port}");

    // Nothing configured: no database or NATS URL, so embedded servers in the data directory
    // (on free ports, so a developer's own stack does not collide with this test).
    let mut up = tokio::process::Command::new(canopy())
        .arg("up")
        .env_remove("DATABASE_URL")
        .env_remove("NATS_URL")
        .env_remove("CANOPY_DATABASE_URL")
        .env_remove("CANOPY_NATS_URL")
        .env_remove("CANOPY_MODEL_BASE_URL")
        .env("CANOPY_DATA_DIR", &data)
        .env("CANOPY_EMBEDDED_PG_PORT", &pg)
        .env("CANOPY_EMBEDDED_NATS_PORT", &nats)
        .env(
            "CANOPY_COMMAND_API_ADDR",
            format!("127.0.0.1:{command_port}"),
        )
        .env("CANOPY_QUERY_API_ADDR", format!("127.0.0.1:{query_port}"))
        .env("CANOPY_RUNNER_ADDR", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("press Ctrl+C") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(ready, "canopy up ended before it was ready");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    // The demo, as a user types it.
    let mut demo = tokio::process::Command::new(canopy())
        .arg("demo")
        .args(["--command-api", &command_api, "--query-api", &query_api])
        .arg("--dir")
        .arg(dir.path().join("demo"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut demo_lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let session = tokio::time::timeout(WAIT, async {
        while let Some(line) = demo_lines.next_line().await.unwrap() {
            if let Some(rest) = line.split_once("started session ") {
                return rest.1.trim().to_owned();
            }
        }
        panic!("the demo started no session");
    })
    .await
    .unwrap();
    let printed = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(line)) = demo_lines.next_line().await {
            all.push(line);
        }
        all
    });

    // An outside watcher of the session's live stream (history first, then live).
    let mut claims = Claims::user(
        "watcher",
        "Watcher",
        "demo-workspace",
        Role::Viewer,
        chrono::Duration::hours(1),
    );
    claims.email = None;
    let token = canopy_auth::mint_hs256(canopy_auth::DEV_SECRET, &claims).unwrap();
    let response = reqwest::Client::new()
        .get(format!("{query_api}/sessions/{session}/stream"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = eventsource_stream::Eventsource::eventsource(response.bytes_stream());
    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.iter().any(|t| t == "BranchPushed") {
        let event = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("the demo did not finish; the stream showed {seen:?}"))
            .expect("the stream ended")
            .unwrap();
        if let Ok(data) = serde_json::from_str::<Value>(&event.data)
            && let Some(t) = data["type"].as_str()
        {
            assert_ne!(t, "PromptFailed", "{data}");
            seen.push(t.to_owned());
        }
    }
    let count = |t: &str| seen.iter().filter(|s| *s == t).count();
    for (event_type, at_least) in [
        ("SessionStarted", 1),
        ("ParticipantJoined", 2),
        ("PromptSubmitted", 2),
        ("PromptStarted", 2),
        ("SandboxStarted", 1),
        ("PlanProposed", 2),
        ("PlanApproved", 2),
        ("ToolApprovalRequested", 2),
        ("ToolApprovalGranted", 2),
        ("ToolExecuted", 3),
        ("CheckpointTaken", 2),
        ("PromptCompleted", 2),
        ("PushRequested", 1),
        ("BranchPushed", 1),
    ] {
        assert!(count(event_type) >= at_least, "{event_type}: {seen:?}");
    }
    let status = tokio::time::timeout(WAIT, demo.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "canopy demo exited with {status}");
    let printed = printed.await.unwrap().join("\n");
    // The viewer's prompt and the member's approval.
    assert_eq!(
        printed.matches("refused, 403 forbidden").count(),
        2,
        "{printed}"
    );
    assert!(printed.contains("where to look"), "{printed}");

    // Ctrl+C: everything stops, nothing of the stack is left running.
    let pid = up.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(60), up.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "canopy up exited with {status}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = processes_under(dir.path());
        if left.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "left running: {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
