//! The auditors' endpoints: who may call them, the session log with its chain fields and head,
//! the verify endpoint naming every kind of tampering at its sequence, the state at a sequence
//! equal to what the read model showed then, and the workspace's export in relay order.

use canopy_domain::Role;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{Stack, token};

/// Runs `statement` as the table owner with triggers off (`{id}` is the session's id).
/// A session of eight events in workspace w1: started, joined, then prompts.
async fn session(stack: &Stack) -> Uuid {
    let member = token(Role::Member, "m1", "w1");
    let session: Uuid = stack
        .command(&member, "/sessions", json!({"title": "audit", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await["id"].as_str().unwrap().parse().unwrap();
    for n in 0..6 {
        stack
            .command(
                &member,
                &format!("/sessions/{session}/prompts"),
                json!({"text": format!("prompt {n}")}),
            )
            .await;
    }
    session
}

async fn first_bad(stack: &Stack, session: Uuid) -> (Option<i64>, Value) {
    let auditor = token(Role::Auditor, "a1", "w1");
    let body = stack
        .get(&auditor, &format!("/audit/sessions/{session}/verify"))
        .await
        .ok();
    (body["first_bad_sequence"].as_i64(), body)
}

#[tokio::test]
async fn only_owners_admins_and_auditors_of_the_workspace_may_audit() {
    let stack = Stack::start_with(false, 2000).await;
    let session = session(&stack).await;
    let path = format!("/audit/sessions/{session}/events");
    for role in [Role::Owner, Role::Admin, Role::Auditor] {
        stack.get(&token(role, "x", "w1"), &path).await.ok();
    }
    for role in [Role::Member, Role::Viewer] {
        stack
            .get(&token(role, "x", "w1"), &path)
            .await
            .problem(403, "forbidden");
    }
    stack
        .get(&crate::support::runner(), &path)
        .await
        .problem(403, "forbidden");
    let auditor = token(Role::Auditor, "a1", "w1");
    // Another workspace's session answers as if it did not exist.
    let other = token(Role::Auditor, "a2", "w2");
    for path in [
        format!("/audit/sessions/{session}/events"),
        format!("/audit/sessions/{session}/verify"),
        format!("/audit/sessions/{session}/state?at_sequence=1"),
    ] {
        stack.get(&other, &path).await.problem(404, "not_found");
        stack
            .get(
                &auditor,
                &path.replace(&session.to_string(), &Uuid::new_v4().to_string()),
            )
            .await
            .problem(404, "not_found");
    }
    assert_eq!(
        stack.get(&other, "/audit/events").await.ok()["events"],
        json!([])
    );
    for bad in [
        format!("/audit/sessions/{session}/events?limit=0"),
        format!("/audit/sessions/{session}/events?limit=1001"),
        format!("/audit/sessions/{session}/events?after=-1"),
        format!("/audit/sessions/{session}/state"),
        format!("/audit/sessions/{session}/state?at_sequence=0"),
        format!("/audit/sessions/{session}/state?at_sequence=99"),
        "/audit/events?after=12".to_owned(),
        "/audit/events?after=1.2.3".to_owned(),
        "/audit/sessions/not-a-uuid/verify".to_owned(),
    ] {
        stack
            .get(&auditor, &bad)
            .await
            .problem(422, "validation_failed");
    }
    stack
        .get("not a token", &path)
        .await
        .problem(401, "unauthorized");
}

#[tokio::test]
async fn the_session_log_pages_every_event_with_metadata_and_chain_fields() {
    let stack = Stack::start_with(false, 2000).await;
    let session = session(&stack).await;
    let auditor = token(Role::Auditor, "a1", "w1");
    let mut events = Vec::new();
    let mut after = 0;
    let mut head: Value;
    loop {
        let page = stack
            .get(
                &auditor,
                &format!("/audit/sessions/{session}/events?after={after}&limit=3"),
            )
            .await
            .ok();
        head = page["head"].clone();
        events.extend(page["events"].as_array().unwrap().iter().cloned());
        match page["next_after"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    let sequences: Vec<i64> = events
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(sequences, (1..=8).collect::<Vec<_>>());
    let prompt = &events[2];
    assert_eq!(prompt["event_type"], "PromptSubmitted");
    assert_eq!(prompt["event_version"], "1");
    assert_eq!(prompt["actor_id"], "m1");
    assert_eq!(prompt["actor_kind"], "user");
    assert!(
        prompt["correlation_id"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    );
    assert!(prompt["idempotency_key"].as_str().is_some());
    assert_eq!(prompt["payload"]["PromptSubmitted"]["text"], "prompt 0");
    assert_eq!(prompt["prev_hash"], events[1]["hash"]);
    assert_eq!(head["sequence"], 8);
    assert_eq!(head["hash"], events[7]["hash"]);
    let (first, body) = first_bad(&stack, session).await;
    assert_eq!(first, None, "{body}");
    assert_eq!(body["intact"], true);
    assert_eq!(body["events_checked"], 8);
}

/// Every tampering of the issue, each on its own session, named at its sequence.
#[tokio::test]
async fn the_verify_endpoint_names_each_tampering_at_its_sequence() {
    let stack = Stack::start_with(false, 2000).await;
    let cases: [(&str, &str, i64, &str); 7] = [
        (
            "payload",
            "UPDATE events SET payload = jsonb_set(payload, '{PromptSubmitted,text}', '\"rm -rf\"') \
              WHERE aggregate_id = '{id}' AND sequence = 5",
            5,
            "payload_altered",
        ),
        (
            "metadata",
            "UPDATE events SET metadata = jsonb_set(metadata, '{actor_id}', '\"mallory\"') \
              WHERE aggregate_id = '{id}' AND sequence = 4",
            4,
            "event_altered",
        ),
        (
            "delete middle",
            "DELETE FROM events WHERE aggregate_id = '{id}' AND sequence = 6",
            6,
            "sequence_gap",
        ),
        (
            "delete newest",
            "DELETE FROM events WHERE aggregate_id = '{id}' AND sequence = 8",
            8,
            "head_mismatch",
        ),
        (
            "swap",
            "UPDATE events SET sequence = 1003 WHERE aggregate_id = '{id}' AND sequence = 3;
             UPDATE events SET sequence = 3 WHERE aggregate_id = '{id}' AND sequence = 7;
             UPDATE events SET sequence = 7 WHERE aggregate_id = '{id}' AND sequence = 1003;",
            3,
            "event_altered",
        ),
        ("rehash", REHASH, 8, "head_mismatch"),
        (
            "forged erasure",
            "SET canopy.erasure = 'on';
             UPDATE events SET payload = jsonb_set(payload, '{PromptSubmitted,author_id}', '\"mallory\"'),
                               erased_at = now()
              WHERE aggregate_id = '{id}' AND sequence = 5;
             RESET canopy.erasure;",
            5,
            "payload_altered",
        ),
    ];
    let mut sessions = Vec::new();
    for _ in &cases {
        sessions.push(session(&stack).await);
    }
    for (session, (name, statement, sequence, kind)) in sessions.iter().zip(&cases) {
        let (first, body) = first_bad(&stack, *session).await;
        assert_eq!(first, None, "{name} before: {body}");
        stack
            .db
            .tamper(&statement.replace("{id}", &session.to_string()))
            .await
            .unwrap();
        let (first, body) = first_bad(&stack, *session).await;
        assert_eq!(first, Some(*sequence), "{name}: {body}");
        assert_eq!(body["problems"][0]["kind"], *kind, "{name}: {body}");
        assert_eq!(body["intact"], false);
    }
    // The sessions left alone still verify.
    let untouched = session(&stack).await;
    assert_eq!(first_bad(&stack, untouched).await.0, None);
}

/// Edits event 5's prompt text and recomputes every digest and link from there on.
pub(crate) const REHASH: &str = "
UPDATE events SET payload = jsonb_set(payload, '{PromptSubmitted,text}', '\"rm -rf\"')
 WHERE aggregate_id = '{id}' AND sequence = 5;
DO $$
DECLARE r record; previous bytea;
BEGIN
  FOR r IN SELECT * FROM events WHERE aggregate_id = '{id}' AND sequence >= 5 ORDER BY sequence LOOP
    SELECT hash INTO previous FROM events e WHERE e.aggregate_type = r.aggregate_type
       AND e.aggregate_id = r.aggregate_id AND e.sequence = r.sequence - 1;
    UPDATE events SET payload_digest = canopy_payload_digest(payload) WHERE event_id = r.event_id;
    UPDATE events SET event_digest = canopy_event_digest(event_id, aggregate_type, aggregate_id,
        sequence, event_type, event_version, recorded_at, payload_digest, metadata),
        prev_hash = previous WHERE event_id = r.event_id;
    UPDATE events SET hash = sha256(prev_hash || event_digest) WHERE event_id = r.event_id;
  END LOOP;
END $$;";

/// The fields the session read model and the aggregate's state both have.
fn comparable_row(row: &Value) -> Value {
    let participants: Vec<Value> = row["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!([p["user_id"], p["name"], p["role"]]))
        .collect();
    json!({
        "status": row["status"], "title": row["title"], "participants": participants,
        "queue_length": row["queue_length"], "running": row["running_prompt_id"],
        "prompts": row["prompt_count"], "checkpoints": row["checkpoint_count"],
        "sandbox_id": row["sandbox_id"],
    })
}

fn comparable_state(state: &Value) -> Value {
    let participants: Vec<Value> = state["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!([p["user_id"], p["name"], p["role"]]))
        .collect();
    json!({
        "status": state["status"], "title": state["title"], "participants": participants,
        "queue_length": state["queue"].as_array().unwrap().len(), "running": state["running"],
        "prompts": state["prompts"].as_object().unwrap().len(),
        "checkpoints": state["checkpoints"].as_array().unwrap().len(),
        "sandbox_id": state["sandbox_id"],
    })
}

#[tokio::test]
async fn the_state_at_a_sequence_is_what_the_read_model_showed_after_that_event() {
    let stack = Stack::start().await;
    let owner = token(Role::Owner, "owner", "w1");
    let member = token(Role::Member, "m1", "w1");
    let runner = crate::support::runner();
    let auditor = token(Role::Auditor, "a1", "w1");
    let created = stack
        .command(&member, "/sessions", json!({"title": "replay", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await;
    let session: Uuid = created["id"].as_str().unwrap().parse().unwrap();
    let mut seen = Vec::new();
    let mut record = async |answer: Value| {
        let version = answer["version"].as_i64().unwrap();
        let row = stack
            .get(
                &auditor,
                &format!("/sessions/{session}?consistent_with={session}:{version}"),
            )
            .await
            .ok();
        assert_eq!(row["version"], version);
        seen.push((version, comparable_row(&row)));
    };
    record(created).await;
    let first = stack
        .command(
            &member,
            &format!("/sessions/{session}/prompts"),
            json!({"text": "one"}),
        )
        .await;
    let prompt = first["id"].as_str().unwrap().to_owned();
    record(first).await;
    record(
        stack
            .command(
                &owner,
                &format!("/sessions/{session}/prompts"),
                json!({"text": "two"}),
            )
            .await,
    )
    .await;
    let base = format!("/runner/sessions/{session}");
    record(
        stack
            .command(
                &runner,
                &format!("{base}/sandbox/started"),
                json!({"sandbox_id": "sb-1", "opencode_session_id": "oc-1"}),
            )
            .await,
    )
    .await;
    record(
        stack
            .command(
                &runner,
                &format!("{base}/prompts/{prompt}/start"),
                json!({}),
            )
            .await,
    )
    .await;
    record(
        stack
            .command(&runner, &format!("{base}/checkpoints"), json!({"prompt_id": prompt, "commit_sha": "abcdef12", "files_changed": ["a.rs"], "trigger": "auto"}))
            .await,
    )
    .await;
    record(
        stack
            .command(
                &runner,
                &format!("{base}/prompts/{prompt}/complete"),
                json!({"summary": "done"}),
            )
            .await,
    )
    .await;
    assert!(seen.len() >= 7);
    for (version, row) in &seen {
        let state = stack
            .get(
                &auditor,
                &format!("/audit/sessions/{session}/state?at_sequence={version}"),
            )
            .await
            .ok();
        assert_eq!(state["at_sequence"], *version);
        assert_eq!(
            comparable_state(&state["state"]),
            *row,
            "state at {version}"
        );
    }
}

/// Pages through the workspace's export until it holds `expected` events (other tests' open
/// transactions may hold the cluster-wide horizon back for a moment).
async fn export(stack: &Stack, expected: usize) -> Vec<Value> {
    let auditor = token(Role::Auditor, "a1", "w1");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut events = Vec::new();
    let mut after = String::new();
    loop {
        let query = if after.is_empty() {
            "/audit/events?limit=5".to_owned()
        } else {
            format!("/audit/events?limit=5&after={after}")
        };
        let page = stack.get(&auditor, &query).await.ok();
        let got = page["events"].as_array().unwrap().clone();
        after = page["next_after"].as_str().unwrap().to_owned();
        if got.is_empty() {
            if events.len() >= expected || tokio::time::Instant::now() > deadline {
                return events;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        events.extend(got);
    }
}

#[tokio::test]
async fn the_workspace_export_pages_in_relay_order_below_the_horizon() {
    let stack = Stack::start_with(false, 2000).await;
    let a = session(&stack).await;
    let b = session(&stack).await;
    // Another workspace's session is not in w1's export.
    let other = token(Role::Member, "o1", "w2");
    stack
        .command(&other, "/sessions", json!({"title": "other", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await;
    let events = export(&stack, 16).await;
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["aggregate_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 16, "{ids:?}");
    assert!(
        ids.iter()
            .all(|id| *id == a.to_string() || *id == b.to_string())
    );
    for id in [a, b] {
        let sequences: Vec<i64> = events
            .iter()
            .filter(|e| e["aggregate_id"] == id.to_string())
            .map(|e| e["sequence"].as_i64().unwrap())
            .collect();
        assert_eq!(sequences, (1..=8).collect::<Vec<_>>());
    }

    // A transaction that holds an id and has not committed holds the horizon: a session created
    // meanwhile is not exported yet (a page after it would otherwise skip the open one's events).
    let mut open = stack.db.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *open)
        .await
        .unwrap();
    // (held briefly: the horizon is cluster-wide, so it pauses every test's relay meanwhile)
    let member = token(Role::Member, "m1", "w1");
    let c = stack
        .command(&member, "/sessions", json!({"title": "late", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await["id"].as_str().unwrap().to_owned();
    let auditor = token(Role::Auditor, "a1", "w1");
    let held = stack.get(&auditor, "/audit/events?limit=1000").await.ok();
    assert!(
        held["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["aggregate_id"] != c.as_str()),
        "{held}"
    );
    open.rollback().await.unwrap();
    let events = export(&stack, 18).await;
    assert_eq!(events.len(), 18);
    assert_eq!(events[16]["aggregate_id"], c.as_str());
}

/// A `UsageRecorded` stored at version 1 (as releases before version 2 wrote it) is read
/// through the upcaster everywhere: command-api still runs commands on the session, the
/// projectors project it, the state endpoint replays it, and the log and verification show it
/// as stored.
#[tokio::test]
async fn an_event_stored_in_its_old_shape_is_upcast_by_every_reader() {
    let stack = Stack::start().await;
    let member = token(Role::Member, "m1", "w1");
    let runner = crate::support::runner();
    let auditor = token(Role::Auditor, "a1", "w1");
    let session: Uuid = stack
        .command(&member, "/sessions", json!({"title": "old", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await["id"].as_str().unwrap().parse().unwrap();
    let prompt = stack
        .command(
            &member,
            &format!("/sessions/{session}/prompts"),
            json!({"text": "one"}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let base = format!("/runner/sessions/{session}");
    stack
        .command(
            &runner,
            &format!("{base}/prompts/{prompt}/start"),
            json!({}),
        )
        .await;
    // sequence 5, in version 1's shape
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('session', $1, 5, 'UsageRecorded', '1', $2, $3)",
    )
    .bind(session.to_string())
    .bind(json!({"UsageRecorded": {"prompt_id": prompt, "tokens_in": 1234, "tokens_out": 56, "cost_micro_usd": 78}}))
    .bind(json!({"actor_id": "agent-runner", "actor_name": "agent-runner", "actor_kind": "service", "correlation_id": "c1", "request_id": "r1"}))
    .execute(stack.db.pool())
    .await
    .unwrap();
    // command-api loads the session through the upcaster
    let done = stack
        .command(
            &runner,
            &format!("{base}/prompts/{prompt}/complete"),
            json!({"summary": "ok"}),
        )
        .await;
    assert_eq!(done["version"], 6);
    // the projectors too
    let row = stack
        .get(
            &auditor,
            &format!("/sessions/{session}?consistent_with={session}:6"),
        )
        .await
        .ok();
    assert_eq!(row["version"], 6);
    let (tokens_in, tokens_out): (i64, i64) =
        sqlx::query_as("SELECT tokens_in, tokens_out FROM read.usage_daily WHERE session_id = $1")
            .bind(session)
            .fetch_one(stack.db.pool())
            .await
            .unwrap();
    assert_eq!((tokens_in, tokens_out), (1234, 56));
    // the replay
    stack
        .get(
            &auditor,
            &format!("/audit/sessions/{session}/state?at_sequence=6"),
        )
        .await
        .ok();
    // the log and the verification show it as stored
    let log = stack
        .get(
            &auditor,
            &format!("/audit/sessions/{session}/events?after=4&limit=1"),
        )
        .await
        .ok();
    assert_eq!(log["events"][0]["event_version"], "1");
    assert_eq!(
        log["events"][0]["payload"]["UsageRecorded"]["tokens_in"],
        1234
    );
    assert_eq!(first_bad(&stack, session).await.0, None);
}
