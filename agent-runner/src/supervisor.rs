//! This runner's drivers: at most one per session, at most `max_sessions` at once.
//!
//! A wake-up for a session ([`Supervisor::poke`]) reaches its driver when this runner has one;
//! otherwise it takes the session's lease and starts one. When another runner holds the lease,
//! the wake-up is passed on over NATS (`<subject prefix>-wake.<session>`; every runner listens),
//! and the holder's driver also re-reads the store every few seconds, so a lost wake-up costs
//! seconds, never the work. Expired leases (a runner died) are swept and taken over.
//!
//! A driver retires when its session has nothing to do, but only if no wake-up arrived since it
//! last read the store (the wake counter), so work submitted while it retires is never missed.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::{Ctx, consumer, driver, lease};

/// What became of a wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poked {
    /// This runner drives the session.
    Driving,
    /// Another runner holds the lease (and was told).
    HeldElsewhere,
    /// This runner is full or stopping: leave the message for later or for another runner.
    Full,
    /// The session's workspace runs as many sessions as its cap allows: the session stays
    /// queued and its wake-up comes back later.
    Queued,
}

#[derive(Debug, Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ctx: Arc<Ctx>,
    drivers: tokio::sync::Mutex<HashMap<Uuid, watch::Sender<u64>>>,
    permits: Arc<Semaphore>,
    stop: watch::Sender<bool>,
    tasks: std::sync::Mutex<JoinSet<()>>,
    /// Sessions this runner found over their workspace's cap (for the status endpoint).
    queued: std::sync::Mutex<std::collections::BTreeSet<Uuid>>,
}

impl Supervisor {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        let permits = Arc::new(Semaphore::new(ctx.config.max_sessions.max(1)));
        Self {
            inner: Arc::new(Inner {
                ctx,
                drivers: tokio::sync::Mutex::new(HashMap::new()),
                permits,
                stop: watch::channel(false).0,
                tasks: std::sync::Mutex::new(JoinSet::new()),
                queued: std::sync::Mutex::default(),
            }),
        }
    }

    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.inner.ctx
    }

    /// Wakes the session's driver, starting one if this runner can take the session.
    pub async fn poke(&self, session: Uuid) -> Result<Poked, sqlx::Error> {
        let inner = &self.inner;
        let mut drivers = inner.drivers.lock().await;
        if let Some(wake) = drivers.get(&session) {
            wake.send_modify(|n| *n += 1);
            return Ok(Poked::Driving);
        }
        if *inner.stop.borrow() {
            return Ok(Poked::Full);
        }
        let Ok(permit) = inner.permits.clone().try_acquire_owned() else {
            return Ok(Poked::Full);
        };
        let ctx = &inner.ctx;
        match lease::take(&ctx.pool, session, &ctx.runner_id, ctx.config.lease_ttl()).await? {
            lease::Taken::Held => {
                inner
                    .queued
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&session);
            }
            lease::Taken::Elsewhere => {
                let subject = format!("{}.{session}", ctx.wake_prefix);
                if let Err(error) = ctx.nats.publish(subject, "".into()).await {
                    tracing::debug!(%error, "cannot pass the wake-up on");
                }
                return Ok(Poked::HeldElsewhere);
            }
            lease::Taken::Capped { cap } => {
                let newly = inner
                    .queued
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(session);
                if newly {
                    tracing::info!(%session, cap, "the workspace runs as many sessions as its cap allows; the session waits");
                    metrics::counter!("canopy_runner_sessions_capped_total").increment(1);
                }
                return Ok(Poked::Queued);
            }
        }
        let (wake, wake_rx) = watch::channel(0u64);
        drivers.insert(session, wake);
        metrics::gauge!("canopy_runner_sessions").set(drivers.len() as f64);
        let supervisor = self.clone();
        let stop = inner.stop.subscribe();
        let ctx = ctx.clone();
        tracing::info!(%session, runner = %ctx.runner_id, "driving the session");
        let task = async move {
            let driven = std::panic::AssertUnwindSafe(driver::drive(
                ctx,
                supervisor.clone(),
                session,
                wake_rx,
                stop,
            ))
            .catch_unwind()
            .await;
            if driven.is_err() {
                tracing::error!(%session, "the session's driver panicked; its lease will expire and the session be taken over");
                supervisor.forget(session).await;
            }
            drop(permit);
        };
        inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spawn(task);
        Ok(Poked::Driving)
    }

    /// Wakes the session's driver if this runner has one (a wake-up from another runner).
    async fn nudge(&self, session: Uuid) {
        if let Some(wake) = self.inner.drivers.lock().await.get(&session) {
            wake.send_modify(|n| *n += 1);
        }
    }

    /// Retires the driver of `session` unless a wake-up arrived after `seen`: releases the
    /// lease. True when retired.
    pub(crate) async fn retire(&self, session: Uuid, seen: u64) -> bool {
        let mut drivers = self.inner.drivers.lock().await;
        if drivers
            .get(&session)
            .is_some_and(|wake| *wake.borrow() != seen)
        {
            return false;
        }
        drivers.remove(&session);
        metrics::gauge!("canopy_runner_sessions").set(drivers.len() as f64);
        let ctx = &self.inner.ctx;
        if let Err(error) = lease::release(&ctx.pool, session, &ctx.runner_id).await {
            tracing::warn!(%error, %session, "cannot release the lease; it will expire");
        }
        tracing::debug!(%session, "session has nothing to do; driver retired");
        true
    }

    /// Stops driving `session` at shutdown: releases the lease so another runner can take it
    /// at once.
    pub(crate) async fn hand_back(&self, session: Uuid) {
        let mut drivers = self.inner.drivers.lock().await;
        drivers.remove(&session);
        let ctx = &self.inner.ctx;
        if let Err(error) = lease::release(&ctx.pool, session, &ctx.runner_id).await {
            tracing::warn!(%error, %session, "cannot hand the lease back; it will expire");
        }
    }

    /// Forgets a driver whose lease is not ours any more (or that crashed).
    pub(crate) async fn forget(&self, session: Uuid) {
        self.inner.drivers.lock().await.remove(&session);
    }

    /// Sessions driven now.
    pub async fn status(&self) -> serde_json::Value {
        let drivers = self.inner.drivers.lock().await;
        let mut sessions: Vec<String> = drivers.keys().map(Uuid::to_string).collect();
        sessions.sort();
        let queued: Vec<String> = self
            .inner
            .queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(Uuid::to_string)
            .collect();
        serde_json::json!({
            "runner_id": self.inner.ctx.runner_id,
            "sessions": sessions,
            "queued_by_cap": queued,
            "max_sessions": self.inner.ctx.config.max_sessions,
            "draining": *self.inner.stop.borrow(),
            "sandbox": {
                "mode": self.inner.ctx.sandbox_isolation.mode.as_str(),
                "cgroups": self.inner.ctx.sandbox_isolation.cgroups,
                "disk_quota_hard": self.inner.ctx.sandbox_isolation.disk_quota_hard,
            },
        })
    }

    /// Consumes, sweeps and drives until `shutdown`, then drains.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let ctx = self.inner.ctx.clone();
        let (stop_background, background_stop) = watch::channel(false);
        let mut background = JoinSet::new();
        background.spawn(consumer::run(self.clone(), background_stop.clone()));
        background.spawn(sweep(self.clone(), background_stop.clone()));
        background.spawn(listen_for_wakes(self.clone(), background_stop.clone()));
        background.spawn(record_sandbox_stops(self.clone(), background_stop.clone()));
        tracing::info!(runner = %ctx.runner_id, max_sessions = ctx.config.max_sessions, "agent runner started");
        shutdown.await;

        tracing::info!("agent runner draining: finishing current steps, handing sessions back");
        let _ = stop_background.send(true);
        let _ = self.inner.stop.send(true);
        while background.join_next().await.is_some() {}
        let mut tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let drained = tokio::time::timeout(ctx.config.drain_timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "drivers did not finish in time; their leases will expire and other runners take over"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        ctx.stop_sandboxes().await;
        Ok(())
    }
}

/// Takes over sessions whose lease expired (their runner died), at start and then regularly.
async fn sweep(supervisor: Supervisor, mut stop: watch::Receiver<bool>) {
    let ctx = supervisor.ctx().clone();
    let every = (ctx.config.lease_ttl() / 3).max(Duration::from_millis(500));
    loop {
        match lease::expired(&ctx.pool, 100).await {
            Ok(sessions) => {
                for session in sessions {
                    tracing::info!(%session, "taking over a session whose runner stopped");
                    if let Err(error) = supervisor.poke(session).await {
                        tracing::warn!(%error, %session, "cannot take the session over");
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read expired leases"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Wake-ups passed on by runners that could not take a session.
async fn listen_for_wakes(supervisor: Supervisor, mut stop: watch::Receiver<bool>) {
    let ctx = supervisor.ctx().clone();
    let subject = format!("{}.*", ctx.wake_prefix);
    let mut subscription = match ctx.nats.subscribe(subject).await {
        Ok(subscription) => subscription,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for wake-ups; relying on polling");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            message = subscription.next() => {
                let Some(message) = message else { return };
                if let Some(session) = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|id| Uuid::parse_str(id).ok())
                {
                    supervisor.nudge(session).await;
                }
            }
        }
    }
}

/// Records `SandboxStopped` when a sandbox this runner started idles out, or is found ended on
/// its own (over its disk quota, at its wall-time cap, crashed) by its next use.
async fn record_sandbox_stops(supervisor: Supervisor, mut stop: watch::Receiver<bool>) {
    let ctx = supervisor.ctx().clone();
    let mut events = ctx.sandboxes.subscribe();
    loop {
        let event = tokio::select! {
            _ = stop.changed() => return,
            event = events.recv() => event,
        };
        match event {
            Ok(canopy_sandbox::LifecycleEvent::Stopped { id, reason }) => {
                let Ok(session) = Uuid::parse_str(&id) else {
                    continue;
                };
                let reason = match reason {
                    canopy_sandbox::StopReason::Idle => "idle",
                    canopy_sandbox::StopReason::Archived => "archived",
                    canopy_sandbox::StopReason::DiskQuota => "over its disk quota",
                    canopy_sandbox::StopReason::Exited => "exited",
                };
                ctx.record_sandbox_stopped(session, reason).await;
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "missed sandbox lifecycle events");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
