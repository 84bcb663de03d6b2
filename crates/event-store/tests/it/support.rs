//! A minimal aggregate for exercising the store without the domain's rules in the way.

use canopy_event_store::{ActorKind, AggregateStore, EventMetadata, StoreConfig};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Tally {
    pub total: i64,
    pub events: u64,
}

#[derive(Debug, Clone)]
pub(crate) enum TallyCommand {
    /// Appends `times` events each adding `n`.
    Add { n: i64, times: usize },
    /// Refused by the aggregate.
    Refuse,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum TallyEvent {
    Added { n: i64 },
}

impl DomainEvent for TallyEvent {
    fn event_type(&self) -> String {
        "Added".into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("refused")]
pub(crate) struct Refused;

impl Aggregate for Tally {
    const TYPE: &'static str = "tally";
    type Command = TallyCommand;
    type Event = TallyEvent;
    type Error = Refused;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), Refused> {
        match command {
            TallyCommand::Add { n, times } => {
                for _ in 0..times {
                    sink.write(TallyEvent::Added { n }, self).await;
                }
                Ok(())
            }
            TallyCommand::Refuse => Err(Refused),
        }
    }

    fn apply(&mut self, event: TallyEvent) {
        let TallyEvent::Added { n } = event;
        self.total += n;
        self.events += 1;
    }
}

pub(crate) fn meta() -> EventMetadata {
    EventMetadata::new("u1", "Ada", ActorKind::User)
}

pub(crate) fn store(pool: &sqlx::PgPool) -> AggregateStore {
    AggregateStore::new(pool.clone(), StoreConfig::default())
}

pub(crate) async fn count_events(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap()
}
