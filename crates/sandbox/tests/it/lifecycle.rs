//! A normal turn in the sandbox, then idle stop, resume and archive through the manager.

use std::time::Duration;

use canopy_opencode::TurnEnd;
use canopy_sandbox::{LifecycleEvent, SandboxManager, SandboxProvider, SandboxStatus, StopReason};
use canopy_testkit::{Script, Step};
use serde_json::json;
use tokio::sync::broadcast;

use crate::support::{Harness, client, owner, titled_session, tool_outputs, turn};

async fn next_event(events: &mut broadcast::Receiver<LifecycleEvent>) -> LifecycleEvent {
    tokio::time::timeout(Duration::from_secs(60), events.recv())
        .await
        .expect("a lifecycle event within a minute")
        .unwrap()
}

#[tokio::test]
async fn turn_writes_the_workspace_and_idle_stop_then_resume_keep_it_and_the_session() {
    lifecycle(Harness::start(Script::new()).await.unwrap()).await;
}

#[tokio::test]
async fn rootless_turn_idle_stop_resume_and_archive() {
    lifecycle(Harness::start_rootless(Script::new()).await.unwrap()).await;
}

async fn lifecycle(h: Harness) {
    h.model.push([
        Step::tool(
            "write",
            json!({ "filePath": "/workspace/notes.txt", "content": "written by the agent\n" }),
        ),
        Step::tool(
            "bash",
            json!({ "command": "echo appended by bash >> notes.txt && git branch --show-current && id -u", "description": "append" }),
        ),
        Step::text("Done."),
    ]);
    let manager = SandboxManager::new(h.provider.clone(), Duration::from_millis(500));
    let mut events = manager.subscribe();
    let spec = h.spec("lifecycle");

    let active = manager.acquire(spec.clone()).await.unwrap();
    let info = active.info().clone();
    assert!(info.startup < Duration::from_secs(20), "{:?}", info.startup);
    match next_event(&mut events).await {
        LifecycleEvent::Started {
            info: started,
            resumed,
        } => {
            assert_eq!(started.id, "lifecycle");
            assert!(!resumed);
        }
        other => panic!("expected a start, got {other:?}"),
    }
    let client = client(&info).unwrap();
    let session = titled_session(&client).await.unwrap();
    let outcome = turn(&client, &session, "Write notes.").await.unwrap();
    assert_eq!(outcome.end, TurnEnd::Completed);
    let outputs = tool_outputs(&outcome);
    assert!(
        outputs[1].contains("canopy/lifecycle"),
        "own branch: {outputs:?}"
    );
    let inside = h.mode().uid_inside(info.uid);
    assert!(outputs[1].contains(&inside.to_string()), "{outputs:?}");
    let notes = h.workspace("lifecycle").join("notes.txt");
    assert_eq!(
        std::fs::read_to_string(&notes).unwrap(),
        "written by the agent\nappended by bash\n"
    );
    assert_eq!(owner(&notes), info.uid);

    drop(active);
    match next_event(&mut events).await {
        LifecycleEvent::Stopped { id, reason } => {
            assert_eq!(id, "lifecycle");
            assert_eq!(reason, StopReason::Idle);
        }
        other => panic!("expected an idle stop, got {other:?}"),
    }
    assert_eq!(
        h.provider.status("lifecycle").await.unwrap(),
        SandboxStatus::Stopped
    );
    // With a hard quota the workspace is in the sandbox's disk image, unmounted while stopped
    // (the resume below reads the file back); rootless it stays in place.
    if h.provider.disk_quota_hard() {
        assert!(
            h.root.join("lifecycle/disk.img").is_file(),
            "the image outlives the stop"
        );
        assert!(!notes.exists(), "unmounted while stopped");
    } else {
        assert!(notes.is_file(), "the workspace outlives the stop")
    }

    h.model.push([
        Step::tool(
            "bash",
            json!({ "command": "cat notes.txt", "description": "read" }),
        ),
        Step::text("Still here."),
    ]);
    let active = manager.acquire(spec).await.unwrap();
    match next_event(&mut events).await {
        LifecycleEvent::Started { resumed, .. } => assert!(resumed),
        other => panic!("expected a resume, got {other:?}"),
    }
    assert!(matches!(
        h.provider.status("lifecycle").await.unwrap(),
        SandboxStatus::Running { .. }
    ));
    let client = crate::support::client(active.info()).unwrap();
    let sessions = client.sessions().await.unwrap();
    assert!(
        sessions.iter().any(|s| s.id == session),
        "the OpenCode session survived"
    );
    let outcome = turn(&client, &session, "Read notes.").await.unwrap();
    assert_eq!(outcome.end, TurnEnd::Completed);
    assert!(tool_outputs(&outcome)[0].contains("appended by bash"));
    assert!(
        client.messages(&session).await.unwrap().len() >= 4,
        "history kept"
    );

    manager.archive("lifecycle").await.unwrap();
    match next_event(&mut events).await {
        LifecycleEvent::Stopped { reason, .. } => assert_eq!(reason, StopReason::Archived),
        other => panic!("expected an archive stop, got {other:?}"),
    }
    assert_eq!(
        h.provider.status("lifecycle").await.unwrap(),
        SandboxStatus::Absent
    );
    assert!(!h.workspace("lifecycle").exists());
    drop(active);
}
