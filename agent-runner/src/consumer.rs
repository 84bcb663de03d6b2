//! The runner's JetStream consumer: one durable pull consumer, shared by every runner, on every
//! session's events (one wildcard filter, `<prefix>.session.>`), explicit ack.
//!
//! A message only says "this session changed"; the driver reads the session from the event
//! store before acting. So order and duplicates do not matter, a gap is never waited for, and a
//! message is acknowledged once its session is in a driver's hands (here, or on the runner that
//! holds the lease). When this runner is full, the message is left for later or for another
//! runner (nak with a delay).

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use canopy_process::Backoff;
use futures::StreamExt;
use tokio::sync::watch;
use uuid::Uuid;

use crate::supervisor::{Poked, Supervisor};

/// The event types a runner acts on.
pub const WAKING_EVENTS: [&str; 13] = [
    "PromptSubmitted",
    "PromptCancelled",
    "PlanApproved",
    "PlanRejected",
    "ToolApprovalGranted",
    "ToolApprovalDenied",
    "CheckpointRequested",
    "RestoreRequested",
    "PushRequested",
    "SessionArchived",
    "SessionCompleted",
    "SessionFailed",
    // A prompt ending lets the next one in the queue start.
    "PromptCompleted",
];

/// Consumes until `stop`; restarts after NATS failures.
pub(crate) async fn run(supervisor: Supervisor, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match consume(&supervisor, &mut stop).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, "runner consumer failed; restarting");
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

async fn consume(supervisor: &Supervisor, stop: &mut watch::Receiver<bool>) -> Result<(), String> {
    let ctx = supervisor.ctx().clone();
    let jetstream = jetstream::new(ctx.nats.clone());
    let Some(stream) =
        canopy_relay::wait_for_stream(&jetstream, &ctx.connections.stream_name, stop).await
    else {
        return Ok(());
    };
    let durable = ctx.config.consumer_name.clone();
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            &durable,
            pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: format!("{}.session.>", ctx.connections.subject_prefix),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 1024,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    loop {
        let message = tokio::select! {
            _ = stop.changed() => return Ok(()),
            message = messages.next() => message,
        };
        let Some(message) = message else {
            return Err("the consumer's message stream ended".to_owned());
        };
        let message = message.map_err(|e| e.to_string())?;
        let ack = match parse(&message.subject, &ctx.connections.subject_prefix) {
            Some((session, event_type)) if WAKING_EVENTS.contains(&event_type) => {
                match supervisor.poke(session).await {
                    Ok(Poked::Driving | Poked::HeldElsewhere) => AckKind::Ack,
                    Ok(Poked::Full) => AckKind::Nak(Some(Duration::from_secs(2))),
                    // over its workspace's cap: back in a while, until a slot frees
                    Ok(Poked::Queued) => AckKind::Nak(Some(QUEUED_RETRY)),
                    Err(error) => {
                        tracing::warn!(%error, %session, "cannot take the session");
                        AckKind::Nak(Some(Duration::from_secs(1)))
                    }
                }
            }
            _ => AckKind::Ack,
        };
        if let Err(error) = message.ack_with(ack).await {
            tracing::debug!(%error, "ack failed; the message comes back and is harmless");
        }
    }
}

/// How soon a session over its workspace's cap is tried again.
const QUEUED_RETRY: Duration = Duration::from_secs(2);

/// `(session id, event type)` from `<prefix>.session.<id>.<type>`.
fn parse<'a>(subject: &'a str, prefix: &str) -> Option<(Uuid, &'a str)> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix(".session.")?;
    let (id, event_type) = rest.split_once('.')?;
    Some((Uuid::parse_str(id).ok()?, event_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_the_session_and_event() {
        let id = Uuid::from_u128(7);
        let subject = format!("canopy.events.session.{id}.PromptSubmitted");
        assert_eq!(
            parse(&subject, "canopy.events"),
            Some((id, "PromptSubmitted"))
        );
        assert_eq!(parse("canopy.events.feature.x.Y", "canopy.events"), None);
        assert_eq!(parse("other.session.x.Y", "canopy.events"), None);
    }
}
