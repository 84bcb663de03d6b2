//! A model that fails, cuts its stream or hangs: the driver's own limits notice, abort the turn,
//! and leave the session idle and usable.

use std::time::Duration;

use canopy_opencode::{
    Agent, PermissionReply, PermissionRequest, StopReason, TurnEnd, TurnPolicy, run_turn,
};
use canopy_testkit::{Script, Step};

use crate::support::{Harness, quick_policy};

fn never_asked(request: &PermissionRequest) -> PermissionReply {
    panic!("nothing should ask: {request:?}")
}

async fn assert_idle(h: &Harness, session_id: &str) {
    let statuses = h.client.session_statuses().await.unwrap();
    assert!(!statuses.contains_key(session_id), "{statuses:?}");
}

#[tokio::test]
async fn a_failing_model_is_stopped_at_the_first_retry() {
    let h = Harness::start(Script::new()).await.unwrap();
    let policy = TurnPolicy {
        max_model_retries: 0,
        ..quick_policy()
    };

    // HTTP 500, then a connection reset in the middle of the stream: OpenCode retries both
    // after a backoff (about 2 s), and announces the retry. OpenCode's runtime words a reset
    // either way, depending on when it reads the closed socket.
    for (step, expected, kept) in [
        (
            Step::fail(500, "upstream exploded"),
            &["upstream exploded"][..],
            "",
        ),
        (
            Step::reset("Partial answer", 2),
            &["reset", "closed unexpectedly"][..],
            "Partial",
        ),
    ] {
        h.model.push([step]);
        let calls_before = h.model.scripted_requests().len();
        let session = h.titled_session(expected[0]).await.unwrap();
        let outcome = run_turn(
            &h.client,
            &session.id,
            &h.prompt(Agent::Build, "Hello?"),
            &mut never_asked,
            &policy,
        )
        .await
        .unwrap();

        let TurnEnd::Stopped(StopReason::ModelRetrying { attempt, message }) = &outcome.end else {
            panic!("not stopped for retrying: {:?}", outcome.end)
        };
        assert_eq!(*attempt, 1);
        assert!(
            expected
                .iter()
                .any(|words| message.to_lowercase().contains(words)),
            "{message}"
        );
        // Stopped during the first backoff, before a second call.
        assert_eq!(h.model.scripted_requests().len(), calls_before + 1);
        assert!(
            outcome.elapsed < Duration::from_secs(15),
            "{:?}",
            outcome.elapsed
        );
        // Aborted during the backoff, the step is closed (without an error), keeping what the
        // model sent before it failed.
        let last = outcome.final_message().unwrap();
        assert!(last.info.is_completed());
        if message.to_lowercase().contains("closed unexpectedly") {
            // read as a failed connection: what arrived before it may not have been read
            assert!(
                last.text().is_empty() || last.text() == kept,
                "{}",
                last.text()
            );
        } else {
            assert_eq!(last.text(), kept);
        }
        assert_idle(&h, &session.id).await;
    }
}

#[tokio::test]
async fn a_cut_stream_is_stopped_instead_of_recalled_forever() {
    let h = Harness::start(Script::new().then_always(Step::cut("Partial answer that will be", 3)))
        .await
        .unwrap();

    // Each cut step is saved with finish `unknown`; two of them stop the turn.
    let session = h.titled_session("cut").await.unwrap();
    let policy = TurnPolicy {
        max_truncated_steps: 2,
        ..quick_policy()
    };
    let outcome = run_turn(
        &h.client,
        &session.id,
        &h.prompt(Agent::Build, "Hello?"),
        &mut never_asked,
        &policy,
    )
    .await
    .unwrap();
    assert_eq!(
        outcome.end,
        TurnEnd::Stopped(StopReason::StreamTruncated { steps: 2 })
    );
    // OpenCode called again right after the first cut, with no retry status in between.
    assert!(h.model.scripted_requests().len() >= 2);
    let cut: Vec<_> = outcome
        .assistant_messages()
        .filter(|message| message.info.finish.as_deref() == Some("unknown"))
        .collect();
    assert!(cut.len() >= 2);
    assert_eq!(cut[0].text(), "Partial answer");
    assert_idle(&h, &session.id).await;

    // Without that limit, the turn deadline stops it, though events never stop coming.
    let session = h.titled_session("cut, deadline").await.unwrap();
    let calls_before = h.model.scripted_requests().len();
    let policy = TurnPolicy {
        max_truncated_steps: usize::MAX,
        max_steps: usize::MAX,
        turn_timeout: Duration::from_secs(5),
        ..quick_policy()
    };
    let outcome = run_turn(
        &h.client,
        &session.id,
        &h.prompt(Agent::Build, "Hello again?"),
        &mut never_asked,
        &policy,
    )
    .await
    .unwrap();
    assert_eq!(
        outcome.end,
        TurnEnd::Stopped(StopReason::DeadlineExceeded {
            after: Duration::from_secs(5)
        })
    );
    assert!(
        outcome.elapsed < Duration::from_secs(15),
        "{:?}",
        outcome.elapsed
    );
    // The model was called again and again (how often depends on the machine's load).
    assert!(h.model.scripted_requests().len() >= calls_before + 2);
    assert_idle(&h, &session.id).await;
}

#[tokio::test]
async fn a_hung_model_is_stopped_by_the_inactivity_timeout() {
    let script = Script::new()
        .then(Step::text("Warmed up."))
        .then(Step::Hang)
        .then(Step::text("Back again."));
    let h = Harness::start(script).await.unwrap();
    let session = h.titled_session("hang").await.unwrap();
    // The first prompt of a server boots its instance and loads plugins, seconds without a
    // session event on a busy machine; only a warm server makes a short timeout mean the model.
    let warm = run_turn(
        &h.client,
        &session.id,
        &h.prompt(Agent::Build, "Warm up."),
        &mut never_asked,
        &quick_policy(),
    )
    .await
    .unwrap();
    assert_eq!(warm.final_text(), "Warmed up.");
    let policy = TurnPolicy {
        inactivity_timeout: Duration::from_secs(2),
        ..quick_policy()
    };

    let outcome = run_turn(
        &h.client,
        &session.id,
        &h.prompt(Agent::Build, "Hello?"),
        &mut never_asked,
        &policy,
    )
    .await
    .unwrap();

    assert_eq!(
        outcome.end,
        TurnEnd::Stopped(StopReason::Inactive {
            after: Duration::from_secs(2)
        })
    );
    assert!(outcome.elapsed >= Duration::from_secs(2));
    assert!(
        outcome.elapsed < Duration::from_secs(15),
        "{:?}",
        outcome.elapsed
    );
    let calls = h.model.scripted_requests();
    assert_eq!(calls.len(), 2, "the warm-up and the hung call");
    assert_eq!(calls[1].last_user_text(), "Hello?");
    let hung = outcome.final_message().unwrap();
    assert!(hung.info.error.as_ref().unwrap().is_aborted());
    assert_idle(&h, &session.id).await;

    // The abort released the session: the next prompt is answered.
    let next = run_turn(
        &h.client,
        &session.id,
        &h.prompt(Agent::Build, "And now?"),
        &mut never_asked,
        &quick_policy(),
    )
    .await
    .unwrap();
    assert_eq!(next.end, TurnEnd::Completed);
    assert_eq!(next.final_text(), "Back again.");
}
