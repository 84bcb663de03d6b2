//! Cursor pagination returns every row once while rows are being added.

use std::collections::HashSet;

use canopy_domain::Role;
use serde_json::json;

use crate::support::{Stack, token, wait_projected};

async fn page_all(stack: &Stack, reader: &str, order: &str, limit: u32) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/sessions?order={order}&limit={limit}");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let page = stack.get(reader, &path).await.ok();
        for item in page["items"].as_array().unwrap() {
            seen.push(item["session_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return seen,
        }
        // keep the writers' inserts interleaved with the paging
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_while_sessions_are_added_returns_every_row_once() {
    let stack = std::sync::Arc::new(Stack::start().await);
    let member = token(Role::Member, "m1", "w1");
    let start = move |stack: std::sync::Arc<Stack>, i: usize| {
        let member = token(Role::Member, "m1", "w1");
        async move {
            stack
                .command(&member, "/sessions", json!({"title": format!("s{i}"), "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
                .await
        }
    };
    for i in 0..30 {
        start(stack.clone(), i).await;
    }
    wait_projected(&stack).await;
    let before: HashSet<String> = page_all(&stack, &member, "asc", 7)
        .await
        .into_iter()
        .collect();
    assert_eq!(before.len(), 30);

    // writers add 30 more while two readers page, oldest first and newest first
    let writer = {
        let stack = stack.clone();
        tokio::spawn(async move {
            for i in 30..60 {
                start(stack.clone(), i).await;
            }
        })
    };
    let ascending = page_all(&stack, &member, "asc", 4).await;
    let descending = page_all(&stack, &member, "desc", 4).await;
    writer.await.unwrap();

    for (name, rows) in [("asc", &ascending), ("desc", &descending)] {
        let unique: HashSet<&String> = rows.iter().collect();
        assert_eq!(unique.len(), rows.len(), "{name}: a row came twice");
        assert!(
            before.iter().all(|id| unique.contains(id)),
            "{name}: a row that existed was skipped"
        );
    }
    wait_projected(&stack).await;
    let after = page_all(&stack, &member, "asc", 9).await;
    assert_eq!(after.len(), 60);
    assert_eq!(after.iter().collect::<HashSet<_>>().len(), 60);
}
