//! People's requests outside prompts: a checkpoint now, a restore, a push to the remote.

use std::time::Duration;

use canopy_domain::Role;
use canopy_testkit::{Script, Step};
use serde_json::json;

use crate::support::{Stack, git, person, write};

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkpoints_restore_and_push_reach_the_workspace_and_the_remote() {
    let script = Script::new()
        .then(Step::text("Plan: first file\n1. write a.txt"))
        .then(write("a.txt", "a\n"))
        .then(Step::text("Wrote a.txt."))
        .then(Step::text("Plan: second file\n1. write b.txt"))
        .then(write("b.txt", "b\n"))
        .then(Step::text("Wrote b.txt."));
    let mut stack = Stack::start(script).await.unwrap();
    stack.start_runner(stack.runner_config()).await.unwrap();
    let member = person("mia", "Mia Member", Role::Member, None);
    let admin = person("ada", "Ada Admin", Role::Admin, None);
    let session = stack.start_session(&member, None).await.unwrap();
    for (round, text) in [(1, "write a"), (2, "write b")] {
        stack.prompt(&member, session, text).await.unwrap();
        stack.approve_plan(&admin, session, round).await;
        stack
            .wait_for(session, "PromptCompleted", round, WAIT)
            .await;
    }
    let first = stack.wait_for(session, "CheckpointTaken", 1, WAIT).await;
    let second = stack.wait_for(session, "CheckpointTaken", 2, WAIT).await;
    assert_eq!(first["files_changed"], json!(["a.txt"]));
    assert_eq!(second["files_changed"], json!(["b.txt"]));
    assert_eq!(first["trigger"], "auto");
    // Commits without a token email get a stable synthesized address.
    let workspace = stack.workspace_of(session);
    let sha = first["commit_sha"].as_str().unwrap();
    assert_eq!(
        git(&workspace, &["log", "-1", "--format=%an <%ae>", sha]).unwrap(),
        "Mia Member <mia@users.canopy.invalid>"
    );

    // A checkpoint asked for by a person, of a change made outside a prompt.
    std::fs::write(workspace.join("notes.txt"), "by hand\n").unwrap();
    stack
        .post(
            &member,
            &format!("/sessions/{session}/checkpoints"),
            json!({ "label": "by hand" }),
        )
        .await
        .unwrap();
    let manual = stack.wait_for(session, "CheckpointTaken", 3, WAIT).await;
    assert_eq!(manual["trigger"], "manual");
    assert_eq!(manual["label"], "by hand");
    assert_eq!(manual["files_changed"], json!(["notes.txt"]));

    // Restore to the first checkpoint: b.txt and notes.txt go, a.txt stays.
    let checkpoint = first["checkpoint_id"].as_str().unwrap();
    stack
        .post(
            &admin,
            &format!("/sessions/{session}/restores"),
            json!({ "checkpoint_id": checkpoint }),
        )
        .await
        .unwrap();
    let restored = stack.wait_for(session, "CheckpointRestored", 1, WAIT).await;
    assert_eq!(restored["checkpoint_id"], checkpoint);
    assert!(workspace.join("a.txt").exists());
    assert!(!workspace.join("b.txt").exists());
    assert!(!workspace.join("notes.txt").exists());

    // Push: the branch reaches the bare remote at the restored commit.
    stack
        .post(&admin, &format!("/sessions/{session}/pushes"), json!({}))
        .await
        .unwrap();
    let pushed = stack.wait_for(session, "BranchPushed", 1, WAIT).await;
    assert_eq!(pushed["commit_sha"], sha);
    let branch = pushed["branch"].as_str().unwrap();
    let remote_sha = git(
        &stack.remote,
        &["rev-parse", &format!("refs/heads/{branch}")],
    )
    .unwrap();
    assert_eq!(remote_sha, sha);
    stack.stop_runners().await;
}
