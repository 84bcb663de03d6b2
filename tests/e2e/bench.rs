//! `canopy bench --quick` end to end, so the command a user runs for the figures cannot rot:
//! it starts its own stack, measures every row from client processes, stops the stack and
//! writes JSON with every row and a figure above zero in each.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::canopy;

/// Every row the bench reports, by id.
const ROWS: &[&str] = &[
    "raw_insert_1",
    "raw_insert_32",
    "events_insert_1",
    "events_insert_32",
    "jetstream_publish_sequential",
    "jetstream_publish_pipelined",
    "command_sql_32",
    "submit_prompt_1_over_32",
    "submit_prompt_8_over_32",
    "submit_prompt_32_over_32",
    "submit_prompt_32_on_1",
    "submit_prompt_latency_short",
    "submit_prompt_latency_long",
    "projection_catch_up",
    "read_session",
    "read_session_sql",
    "read_sessions_page",
    "read_sessions_page_sql",
    "read_prompts_page",
    "read_prompts_page_sql",
    "read_analytics_tools",
    "read_analytics_tools_sql",
    "lag_command",
    "lag_publish",
    "lag_projection",
    "lag_sse",
    "rebuild_sessions",
    "peak_rss_canopy_up",
    "peak_rss_nats_server",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canopy_bench_quick_writes_every_row_with_figures() {
    let out = tempfile::Builder::new()
        .prefix("canopy-bench-e2e-")
        .tempdir()
        .unwrap();
    let run = tokio::process::Command::new(canopy())
        .args(["bench", "--quick", "--out"])
        .arg(out.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("canopy bench --quick took over 10 minutes")
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "canopy bench --quick exited with {}:\n{printed}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let files: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let report: Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(report["quick"], true);
    let rows = report["rows"].as_array().unwrap();
    let ids: Vec<&str> = rows.iter().map(|row| row["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ROWS, "the rows, in order");
    for row in rows {
        let value = row["value"].as_f64().unwrap();
        assert!(value > 0.0, "{row}");
        for figure in ["p50_ms", "p99_ms"] {
            if let Some(ms) = row.get(figure) {
                assert!(ms.as_f64().unwrap() > 0.0, "{row}");
            }
        }
        if let Some(ratios) = row.get("ratios") {
            for ratio in ratios.as_object().unwrap().values() {
                assert!(ratio.as_f64().unwrap() > 0.0, "{row}");
            }
        }
        // the table printed the same row
        assert!(
            printed.contains(row["label"].as_str().unwrap()),
            "{row} not in:\n{printed}"
        );
    }
    // the submit rows are compared with both baselines, the reads with their SQL
    for (id, to) in [
        ("submit_prompt_32_over_32", "raw_insert_32"),
        ("submit_prompt_32_over_32", "command_sql_32"),
        ("submit_prompt_32_on_1", "command_sql_32"),
        ("submit_prompt_latency_long", "submit_prompt_latency_short"),
        ("read_sessions_page", "read_sessions_page_sql"),
    ] {
        let row = rows.iter().find(|row| row["id"] == id).unwrap();
        assert!(row["ratios"][to].as_f64().unwrap() > 0.0, "{row}");
    }
}
