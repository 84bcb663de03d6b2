//! Every query of docs/analytics.md, run as the read-only `canopy_analyst` role against a seeded
//! database, gives the answer the seed implies; and the role can read nothing else.

use sqlx::Connection;

const SEED: &str = r#"
INSERT INTO read.sessions (session_id, workspace_id, title, repository_url, base_branch, session_branch, status,
    started_by, started_at, last_activity_at, version) VALUES
 ('00000000-0000-0000-0000-000000000001', 'w1', 'Alpha', 'https://g/r', 'main', 'c/a', 'active', 'a', '2026-01-01T08:00:00Z', '2026-01-01T09:00:00Z', 10),
 ('00000000-0000-0000-0000-000000000002', 'w1', 'Beta', 'https://g/r', 'main', 'c/b', 'completed', 'b', '2026-01-01T08:00:00Z', '2026-01-02T09:00:00Z', 10),
 ('00000000-0000-0000-0000-000000000003', 'w2', 'Gamma', 'https://g/r', 'main', 'c/g', 'active', 'c', '2026-01-01T08:00:00Z', '2026-01-01T09:00:00Z', 10);

INSERT INTO read.prompts (prompt_id, session_id, workspace_id, author_id, author_name, text_preview, text_length, status,
    submitted_sequence, submitted_at, started_at, finished_at) VALUES
 ('00000000-0000-0000-0000-0000000000a1', '00000000-0000-0000-0000-000000000001', 'w1', 'a', 'A', 'p', 1, 'completed', 3, '2026-01-01T08:00:00Z', '2026-01-01T08:00:10Z', '2026-01-01T08:01:10Z'),
 ('00000000-0000-0000-0000-0000000000a2', '00000000-0000-0000-0000-000000000001', 'w1', 'a', 'A', 'p', 1, 'completed', 4, '2026-01-01T09:00:00Z', '2026-01-01T09:00:30Z', '2026-01-01T09:02:30Z'),
 ('00000000-0000-0000-0000-0000000000a3', '00000000-0000-0000-0000-000000000002', 'w1', 'a', 'A', 'p', 1, 'queued', 3, '2026-01-02T08:00:00Z', NULL, NULL),
 ('00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-000000000002', 'w1', 'b', 'B', 'p', 1, 'completed', 4, '2026-01-01T10:00:00Z', '2026-01-01T10:00:20Z', '2026-01-01T10:00:50Z'),
 ('00000000-0000-0000-0000-0000000000c1', '00000000-0000-0000-0000-000000000003', 'w2', 'c', 'C', 'p', 1, 'running', 3, '2026-01-01T10:00:00Z', '2026-01-01T10:01:00Z', NULL);

INSERT INTO read.plans (plan_id, prompt_id, session_id, workspace_id, status, summary, steps, proposed_by, proposed_at,
    reviewer_id, decided_at, time_to_decision_ms) VALUES
 ('00000000-0000-0000-0000-00000000f001', '00000000-0000-0000-0000-0000000000a1', '00000000-0000-0000-0000-000000000001', 'w1', 'approved', 's', '[]', 'runner', '2026-01-01T08:00:00Z', 'o1', '2026-01-01T08:00:01Z', 1000),
 ('00000000-0000-0000-0000-00000000f002', '00000000-0000-0000-0000-0000000000a1', '00000000-0000-0000-0000-000000000001', 'w1', 'approved', 's', '[]', 'runner', '2026-01-01T08:00:00Z', 'o1', '2026-01-01T08:00:03Z', 3000),
 ('00000000-0000-0000-0000-00000000f003', '00000000-0000-0000-0000-0000000000a2', '00000000-0000-0000-0000-000000000001', 'w1', 'approved', 's', '[]', 'runner', '2026-01-01T08:00:00Z', 'o2', '2026-01-01T08:00:05Z', 5000),
 ('00000000-0000-0000-0000-00000000f004', '00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-000000000002', 'w1', 'rejected', 's', '[]', 'runner', '2026-01-01T08:00:00Z', 'o1', '2026-01-01T08:00:02Z', 2000),
 ('00000000-0000-0000-0000-00000000f005', '00000000-0000-0000-0000-0000000000c1', '00000000-0000-0000-0000-000000000003', 'w2', 'approved', 's', '[]', 'runner', '2026-01-01T08:00:00Z', 'o3', '2026-01-01T08:00:10Z', 10000),
 ('00000000-0000-0000-0000-00000000f006', '00000000-0000-0000-0000-0000000000c1', '00000000-0000-0000-0000-000000000003', 'w2', 'pending', 's', '[]', 'runner', '2026-01-01T08:00:00Z', NULL, NULL, NULL);

INSERT INTO read.tool_executions (event_id, session_id, workspace_id, prompt_id, call_id, tool, phase, status, duration_ms,
    input_summary, output_summary, executed_at, sequence) VALUES
 ('00000000-0000-0000-0000-00000000e001', '00000000-0000-0000-0000-000000000001', 'w1', '00000000-0000-0000-0000-0000000000a1', 'c1', 'bash', 'build', 'completed', 10, '', '', '2026-01-01T08:00:20Z', 5),
 ('00000000-0000-0000-0000-00000000e002', '00000000-0000-0000-0000-000000000001', 'w1', '00000000-0000-0000-0000-0000000000a1', 'c2', 'bash', 'build', 'failed', 10, '', '', '2026-01-01T08:00:21Z', 6),
 ('00000000-0000-0000-0000-00000000e003', '00000000-0000-0000-0000-000000000001', 'w1', '00000000-0000-0000-0000-0000000000a1', 'c3', 'bash', 'build', 'completed', 10, '', '', '2026-01-01T08:00:22Z', 7),
 ('00000000-0000-0000-0000-00000000e004', '00000000-0000-0000-0000-000000000002', 'w1', '00000000-0000-0000-0000-0000000000b1', 'c4', 'read', 'plan', 'completed', 10, '', '', '2026-01-01T08:00:23Z', 5),
 ('00000000-0000-0000-0000-00000000e005', '00000000-0000-0000-0000-000000000002', 'w1', '00000000-0000-0000-0000-0000000000b1', 'c5', 'read', 'plan', 'completed', 10, '', '', '2026-01-01T08:00:24Z', 6),
 ('00000000-0000-0000-0000-00000000e006', '00000000-0000-0000-0000-000000000003', 'w2', '00000000-0000-0000-0000-0000000000c1', 'c6', 'edit', 'build', 'failed', 10, '', '', '2026-01-01T08:00:25Z', 5);

INSERT INTO read.tool_approvals (request_id, session_id, workspace_id, prompt_id, call_id, tool, input_summary, status, requested_at) VALUES
 ('00000000-0000-0000-0000-00000000d001', '00000000-0000-0000-0000-000000000001', 'w1', '00000000-0000-0000-0000-0000000000a1', 'c1', 'bash', '', 'granted', '2026-01-01T08:00:00Z'),
 ('00000000-0000-0000-0000-00000000d002', '00000000-0000-0000-0000-000000000001', 'w1', '00000000-0000-0000-0000-0000000000a1', 'c9', 'bash', '', 'denied', '2026-01-01T08:00:00Z'),
 ('00000000-0000-0000-0000-00000000d003', '00000000-0000-0000-0000-000000000003', 'w2', '00000000-0000-0000-0000-0000000000c1', 'c8', 'webfetch', '', 'denied', '2026-01-01T08:00:00Z');

INSERT INTO read.checkpoints (checkpoint_id, session_id, workspace_id, commit_sha, files_changed, trigger, taken_at, restore_count) VALUES
 ('00000000-0000-0000-0000-00000000c001', '00000000-0000-0000-0000-000000000001', 'w1', 'abc1234', '[]', 'auto', '2026-01-01T08:00:00Z', 2),
 ('00000000-0000-0000-0000-00000000c002', '00000000-0000-0000-0000-000000000002', 'w1', 'abc1235', '[]', 'auto', '2026-01-01T08:00:00Z', 0),
 ('00000000-0000-0000-0000-00000000c003', '00000000-0000-0000-0000-000000000003', 'w2', 'abc1236', '[]', 'manual', '2026-01-01T08:00:00Z', 1);

INSERT INTO read.usage_daily (session_id, workspace_id, user_id, day, tokens_in, tokens_out, cost_micro_usd) VALUES
 ('00000000-0000-0000-0000-000000000001', 'w1', 'a', '2026-01-01', 1000, 100, 1500000),
 ('00000000-0000-0000-0000-000000000001', 'w1', 'a', '2026-01-02', 500, 50, 500000),
 ('00000000-0000-0000-0000-000000000002', 'w1', 'b', '2026-01-01', 200, 20, 250000);

INSERT INTO read.features (feature_id, workspace_id, title, description, status, created_by, created_at, session_count,
    learning_count, decision_count, version) VALUES
 ('00000000-0000-0000-0000-0000000000f1', 'w1', 'Login', '', 'active', 'a', '2026-01-01T08:00:00Z', 2, 3, 1, 7),
 ('00000000-0000-0000-0000-0000000000f2', 'w1', 'Billing', '', 'active', 'a', '2026-01-01T08:00:00Z', 1, 0, 0, 2);
"#;

/// The SQL blocks of docs/analytics.md that follow a "### Q" heading, in order.
fn questions() -> Vec<(String, String)> {
    let doc = include_str!("../../../docs/analytics.md");
    let mut out = Vec::new();
    let mut heading = None;
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if let Some(title) = line.strip_prefix("### ") {
            heading = Some(title.to_owned());
        } else if line.trim() == "```sql"
            && let Some(title) = heading.take()
        {
            let sql: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            out.push((title, sql.join("\n")));
        }
    }
    out
}

#[tokio::test]
async fn the_documented_questions_answer_right_as_the_analyst_role() {
    let db = canopy_testkit::database().await.unwrap();
    sqlx::raw_sql(SEED).execute(db.pool()).await.unwrap();
    let expected: Vec<Vec<&str>> = vec![
        vec!["w1|3000", "w2|10000"],
        vec!["bash|3|0.333", "read|2|0.000", "edit|1|1.000"],
        vec![
            "2026-01-01|a|2",
            "2026-01-01|b|1",
            "2026-01-01|c|1",
            "2026-01-02|a|1",
        ],
        vec![
            "00000000-0000-0000-0000-000000000001|Alpha|2",
            "00000000-0000-0000-0000-000000000003|Gamma|1",
        ],
        vec!["a|180", "b|30"],
        vec!["Alpha|2.0000|1650", "Beta|0.2500|220"],
        vec!["o1|3|0.333", "o2|1|0.000", "o3|1|0.000"],
        vec!["bash|2|1", "webfetch|1|1"],
        vec!["w1|20.0", "w2|60.0"],
        vec!["Login|2|3|1", "Billing|1|0|0"],
    ];
    let questions = questions();
    assert_eq!(
        questions.len(),
        10,
        "docs/analytics.md must answer ten questions"
    );

    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("SET ROLE canopy_analyst")
        .execute(&mut conn)
        .await
        .unwrap();
    for ((title, sql), expected) in questions.iter().zip(expected) {
        // each row as Postgres's record text, "(a,b,c)", which keeps numeric scales as written
        let wrapped = format!(
            "SELECT (q.*)::text FROM ({}) q",
            sql.trim().trim_end_matches(';')
        );
        let rows: Vec<String> = sqlx::query_scalar(&wrapped)
            .fetch_all(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{title}: {e}"));
        let got: Vec<String> = rows
            .iter()
            .map(|row| {
                row.trim_start_matches('(')
                    .trim_end_matches(')')
                    .replace(',', "|")
            })
            .collect();
        assert_eq!(got, expected, "{title}");
    }
    // the role reads the read models only
    let denied = sqlx::query("SELECT count(*) FROM public.events")
        .fetch_one(&mut conn)
        .await;
    assert!(denied.is_err(), "the analyst role can read the event store");
    let write = sqlx::query("DELETE FROM read.sessions")
        .execute(&mut conn)
        .await;
    assert!(write.is_err(), "the analyst role can write");
}
