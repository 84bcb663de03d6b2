//! `canopy audit`: an untouched export verifies offline; every tampering made in the database
//! is named at its line and sequence; an erased export verifies and holds none of the erased
//! text; a forged erasure does not verify; every exported event validates against its schema.

use std::path::{Path, PathBuf};

use canopy::audit::{AuditArgs, AuditCommand, EraseArgs, ExportArgs, read_events};
use canopy::{Command, DatabaseArgs, execute};
use canopy_domain::session::{CheckpointTrigger, SessionPolicy, ToolPhase, ToolStatus};
use canopy_domain::{Actor, Role, Session, SessionCommand};
use canopy_event_store::{ActorKind, AggregateStore, EventMetadata, StoreConfig};
use uuid::Uuid;

const SECRET_TEXT: &str = "fix the login bug, my phone is 555-0100";

fn member() -> Actor {
    Actor::person("m1", "Mallory Member", Role::Member, "w1")
}

fn owner() -> Actor {
    Actor::person("o1", "Olive Owner", Role::Owner, "w1")
}

fn runner() -> Actor {
    Actor::runner("agent-runner", "Agent runner")
}

/// A session through most of its event types: 17 events.
async fn session(pool: &sqlx::PgPool) -> Uuid {
    let store = AggregateStore::new(pool.clone(), StoreConfig::default());
    let session = Uuid::new_v4();
    let (p1, p2, plan, request) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let commands = vec![
        SessionCommand::StartSession {
            actor: member(),
            session_id: session,
            workspace_id: "w1".into(),
            feature_id: None,
            title: "login".into(),
            repository_url: "https://g.example.invalid/r".into(),
            base_branch: "main".into(),
            session_branch: format!("canopy/{session}"),
        },
        SessionCommand::JoinSession { actor: owner() },
        SessionCommand::SubmitPrompt {
            actor: member(),
            prompt_id: p1,
            text: SECRET_TEXT.into(),
        },
        SessionCommand::SubmitPrompt {
            actor: owner(),
            prompt_id: p2,
            text: "then add tests".into(),
        },
        SessionCommand::RecordSandboxStarted {
            actor: runner(),
            sandbox_id: "sb-1".into(),
            opencode_session_id: "oc-1".into(),
        },
        SessionCommand::StartPrompt {
            actor: runner(),
            prompt_id: p1,
        },
        SessionCommand::ProposePlan {
            actor: runner(),
            plan_id: plan,
            prompt_id: p1,
            summary: "edit login.rs".into(),
            steps: vec!["read".into(), "edit".into()],
        },
        SessionCommand::ApprovePlan {
            actor: owner(),
            plan_id: plan,
        },
        SessionCommand::RequestToolApproval {
            actor: runner(),
            request_id: request,
            prompt_id: p1,
            call_id: "call_1".into(),
            tool: "bash".into(),
            input_summary: "cargo test".into(),
        },
        SessionCommand::GrantToolApproval {
            actor: owner(),
            request_id: request,
        },
        SessionCommand::RecordToolExecution {
            actor: runner(),
            prompt_id: p1,
            call_id: "call_1".into(),
            tool: "bash".into(),
            phase: ToolPhase::Build,
            input_summary: "cargo test".into(),
            output_summary: "ok".into(),
            status: ToolStatus::Completed,
            duration_ms: 900,
        },
        SessionCommand::RecordAgentMessage {
            actor: runner(),
            prompt_id: p1,
            message_id: "msg_1".into(),
            text: "Done: fixed".into(),
        },
        SessionCommand::RecordUsage {
            actor: runner(),
            prompt_id: p1,
            tokens_in: 1000,
            tokens_out: 100,
            cost_micro_usd: 2500,
        },
        SessionCommand::RecordCheckpoint {
            actor: runner(),
            checkpoint_id: Uuid::new_v4(),
            prompt_id: Some(p1),
            label: None,
            commit_sha: "abcdef12".into(),
            files_changed: vec!["login.rs".into()],
            trigger: CheckpointTrigger::Auto,
        },
        SessionCommand::CompletePrompt {
            actor: runner(),
            prompt_id: p1,
            summary: Some("fixed".into()),
        },
        SessionCommand::RecordSandboxStopped {
            actor: runner(),
            sandbox_id: "sb-1".into(),
            reason: "idle".into(),
        },
    ];
    for command in commands {
        let actor = command.actor().clone();
        let kind = if actor.is_runner() {
            ActorKind::Service
        } else {
            ActorKind::User
        };
        let metadata = EventMetadata::new(&actor.id, &actor.name, kind);
        store
            .execute::<Session>(
                &session.to_string(),
                command,
                &SessionPolicy::default(),
                &metadata,
                None,
            )
            .await
            .unwrap();
    }
    session
}

fn database(db: &canopy_testkit::TestDb) -> DatabaseArgs {
    DatabaseArgs {
        database_url: Some(db.url.clone()),
    }
}

async fn export_session(db: &canopy_testkit::TestDb, session: Uuid, dir: &Path) -> PathBuf {
    let output = dir.join(format!("{session}.ndjson"));
    execute(Command::Audit(AuditArgs {
        command: AuditCommand::Export(ExportArgs {
            database: database(db),
            session: Some(session),
            workspace: None,
            output: output.clone(),
        }),
    }))
    .await
    .unwrap();
    output
}

async fn verify(file: &Path) -> Result<String, String> {
    execute(Command::Audit(AuditArgs {
        command: AuditCommand::Verify {
            file: file.to_owned(),
        },
    }))
    .await
    .map_err(|e| format!("{e:#}"))
}

#[tokio::test]
async fn an_untouched_export_verifies_offline() {
    let db = canopy_testkit::database().await.unwrap();
    let session = session(db.pool()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = export_session(&db, session, dir.path()).await;
    drop(db); // offline: no database from here on
    let out = verify(&file).await.unwrap();
    assert!(out.contains("intact: 17 events in 1 streams"), "{out}");
    // The file's first line is the header, the last the head.
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 19);
    assert!(lines[0].contains("\"kind\":\"export\""));
    assert!(lines[18].contains("\"kind\":\"head\""));

    // An edit to the file itself is named at its line.
    let edited = text.replacen("then add tests", "then delete prod", 1);
    std::fs::write(&file, edited).unwrap();
    let error = verify(&file).await.unwrap_err();
    assert!(error.contains("line 6:"), "{error}");
    assert!(error.contains("sequence 5: payload_altered"), "{error}");
}

/// (what, statement, line of the first problem, its sequence and kind). Line n+1 holds
/// sequence n; line 19 the head.
const CASES: [(&str, &str, usize, i64, &str); 7] = [
    (
        "payload",
        "UPDATE events SET payload = jsonb_set(payload, '{PromptSubmitted,text}', '\"rm -rf\"') \
          WHERE aggregate_id = '{id}' AND sequence = 4",
        5,
        4,
        "payload_altered",
    ),
    (
        "metadata",
        "UPDATE events SET metadata = jsonb_set(metadata, '{actor_id}', '\"mallory\"') \
          WHERE aggregate_id = '{id}' AND sequence = 6",
        7,
        6,
        "event_altered",
    ),
    (
        "delete middle",
        "DELETE FROM events WHERE aggregate_id = '{id}' AND sequence = 9",
        // the event after the gap, sequence 10, moved up to line 10
        10,
        9,
        "sequence_gap",
    ),
    (
        "delete newest",
        "DELETE FROM events WHERE aggregate_id = '{id}' AND sequence = 17",
        // the head line, right after the 16 events left
        18,
        17,
        "head_mismatch",
    ),
    (
        "swap",
        "UPDATE events SET sequence = 1003 WHERE aggregate_id = '{id}' AND sequence = 3;
         UPDATE events SET sequence = 3 WHERE aggregate_id = '{id}' AND sequence = 8;
         UPDATE events SET sequence = 8 WHERE aggregate_id = '{id}' AND sequence = 1003;",
        4,
        3,
        "event_altered",
    ),
    ("rehash", REHASH, 19, 17, "head_mismatch"),
    (
        "forged erasure",
        "SET canopy.erasure = 'on';
         UPDATE events SET payload = jsonb_set(payload, '{PromptSubmitted,author_id}', '\"o1\"'),
                           erased_at = now()
          WHERE aggregate_id = '{id}' AND sequence = 4;
         RESET canopy.erasure;",
        5,
        4,
        "payload_altered",
    ),
];

/// Edits event 4's prompt text and recomputes every digest and link from there on.
const REHASH: &str = "
UPDATE events SET payload = jsonb_set(payload, '{PromptSubmitted,text}', '\"rm -rf\"')
 WHERE aggregate_id = '{id}' AND sequence = 4;
DO $$
DECLARE r record; previous bytea;
BEGIN
  FOR r IN SELECT * FROM events WHERE aggregate_id = '{id}' AND sequence >= 4 ORDER BY sequence LOOP
    SELECT hash INTO previous FROM events e WHERE e.aggregate_type = r.aggregate_type
       AND e.aggregate_id = r.aggregate_id AND e.sequence = r.sequence - 1;
    UPDATE events SET payload_digest = canopy_payload_digest(payload) WHERE event_id = r.event_id;
    UPDATE events SET event_digest = canopy_event_digest(event_id, aggregate_type, aggregate_id,
        sequence, event_type, event_version, recorded_at, payload_digest, metadata),
        prev_hash = previous WHERE event_id = r.event_id;
    UPDATE events SET hash = sha256(prev_hash || event_digest) WHERE event_id = r.event_id;
  END LOOP;
END $$;";

#[tokio::test]
async fn every_tampering_in_the_database_is_named_at_its_line_and_sequence() {
    let db = canopy_testkit::database().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, statement, line, sequence, kind) in CASES {
        let session = session(db.pool()).await;
        db.tamper(&statement.replace("{id}", &session.to_string()))
            .await
            .unwrap();
        let file = export_session(&db, session, dir.path()).await;
        let error = verify(&file).await.unwrap_err();
        let first = error.lines().next().unwrap();
        assert!(
            first.contains(&format!(
                "NOT intact: line {line}: session/{session} sequence {sequence}: {kind}"
            )),
            "{name}: {error}"
        );
        // The database's verification names the same sequence first.
        let report = canopy_event_store::verify_chain(db.pool(), "session", &session.to_string())
            .await
            .unwrap();
        let problem = report.first_problem().unwrap();
        assert_eq!(problem.sequence, sequence, "{name}: {report:?}");
    }
}

async fn erase(db: &canopy_testkit::TestDb, user: &str) -> String {
    execute(Command::Audit(AuditArgs {
        command: AuditCommand::Erase(EraseArgs {
            database: database(db),
            user: user.into(),
            reason: "GDPR request 42".into(),
            by: "dpo".into(),
        }),
    }))
    .await
    .unwrap()
}

#[tokio::test]
async fn an_erased_export_verifies_and_holds_none_of_the_erased_text() {
    let db = canopy_testkit::database().await.unwrap();
    let session = session(db.pool()).await;
    let out = erase(&db, "m1").await;
    assert!(
        out.contains("erased 2 events of user m1 in workspace w1"),
        "{out}"
    );
    // Nothing more to erase the second time.
    assert_eq!(erase(&db, "m1").await, "nothing to erase for user m1");

    let dir = tempfile::tempdir().unwrap();
    let file = export_session(&db, session, dir.path()).await;
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("555-0100"), "the prompt text is still there");
    let events = read_events(&file).unwrap();
    // (the actor's display name in metadata stays: the event digest covers metadata as is)
    assert!(
        events.iter().all(|e| !e.payload.contains("Mallory")),
        "the name is still in a payload"
    );
    let erased: Vec<_> = events.iter().filter(|e| e.erased).collect();
    assert_eq!(erased.len(), 2);
    assert!(erased.iter().all(|e| e.payload.contains("[erased]")));
    let erasure = events
        .iter()
        .find(|e| e.aggregate_type == "erasure")
        .expect("the erasure event is exported with the session");
    assert!(erasure.payload.contains("GDPR request 42"));
    assert!(erasure.metadata.contains("\"actor_id\": \"dpo\""));
    let out = verify(&file).await.unwrap();
    assert!(out.contains("intact: 18 events in 2 streams"), "{out}");
    let report = canopy_event_store::verify_chain(db.pool(), "session", &session.to_string())
        .await
        .unwrap();
    assert!(report.is_intact(), "{report:?}");
    // The session still loads and replays from its erased events.
    let store = AggregateStore::new(db.pool().clone(), StoreConfig::default());
    let loaded = store.load::<Session>(&session.to_string()).await.unwrap();
    assert_eq!(loaded.version, 17);

    // Without its erasure event an erased payload does not verify.
    let without: String = text
        .lines()
        .filter(|l| !l.contains("\"aggregate_type\":\"erasure\""))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&file, without).unwrap();
    let error = verify(&file).await.unwrap_err();
    assert!(
        error.contains(&format!(
            "NOT intact: line 3: session/{session} sequence 2: payload_altered"
        )),
        "{error}"
    );

    // Another payload change on an erased event is refused by the guard, and caught behind it.
    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL canopy.erasure = 'on'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let refused = sqlx::query(
        "UPDATE events SET payload = canopy_erasure_tombstone(event_type, event_version, payload), \
                erased_at = now() WHERE aggregate_id = $1 AND sequence = 5",
    )
    .bind(session.to_string())
    .execute(&mut *tx)
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("append-only"), "{refused}");
    drop(tx);
    db.tamper(
        &"UPDATE events SET payload = jsonb_set(payload, '{PromptSubmitted,author_id}', '\"o1\"') \
          WHERE aggregate_id = '{id}' AND sequence = 4"
            .replace("{id}", &session.to_string()),
    )
    .await
    .unwrap();
    let file = export_session(&db, session, dir.path()).await;
    let error = verify(&file).await.unwrap_err();
    assert!(error.contains("sequence 4: payload_altered"), "{error}");
}

#[tokio::test]
async fn every_exported_event_validates_against_its_schema() {
    let db = canopy_testkit::database().await.unwrap();
    let session = session(db.pool()).await;
    erase(&db, "o1").await;
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("w1.ndjson");
    execute(Command::Audit(AuditArgs {
        command: AuditCommand::Export(ExportArgs {
            database: database(&db),
            session: None,
            workspace: Some("w1".into()),
            output: output.clone(),
        }),
    }))
    .await
    .unwrap();
    assert!(verify(&output).await.is_ok());
    let schemas = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    let events = read_events(&output).unwrap();
    assert_eq!(events.len(), 18);
    let mut types = std::collections::BTreeSet::new();
    for event in &events {
        let path = schemas.join(format!(
            "{}/{}.v{}.json",
            event.aggregate_type, event.event_type, event.event_version
        ));
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap();
        let payload: serde_json::Value = serde_json::from_str(&event.payload).unwrap();
        let body = &payload[&event.event_type];
        let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{} {}: {errors:?}",
            event.event_type,
            event.sequence
        );
        types.insert(event.event_type.clone());
    }
    assert!(types.len() >= 15, "{types:?}");
    assert!(events.iter().any(|e| e.aggregate_id == session.to_string()));
}
