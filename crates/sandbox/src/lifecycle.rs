//! Sandbox lifecycle for the runner: start on the first prompt, stop after an idle time, resume
//! on the next prompt, remove on archive.
//!
//! The manager does not record events itself (that is the runner's job, as `SandboxStarted` /
//! `SandboxStopped`); it announces every start and stop on a broadcast channel
//! ([`SandboxManager::subscribe`]) with what the runner needs to record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::Error;
use crate::provider::{SandboxInfo, SandboxProvider, SandboxSpec, SandboxStatus};

/// Why a sandbox stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Nobody used it for the idle time.
    Idle,
    /// The session was archived; the sandbox and its workspace are gone.
    Archived,
    /// It was found over its disk quota and stopped (rootless: the quota is a check). Announced
    /// when the next use finds it so, before it starts again.
    DiskQuota,
    /// It ended on its own (wall-time cap, crash); announced like [`StopReason::DiskQuota`].
    Exited,
}

/// In an exit's status when the provider stopped the sandbox over its disk quota.
pub const DISK_QUOTA_EXIT: &str = "stopped over its disk quota";

/// A start or stop, for the runner to record.
#[derive(Debug, Clone)]
pub enum LifecycleEvent {
    Started { info: SandboxInfo, resumed: bool },
    Stopped { id: String, reason: StopReason },
}

/// Starts, idles out and removes the sandboxes of sessions.
#[derive(Debug)]
pub struct SandboxManager {
    provider: Arc<dyn SandboxProvider>,
    idle_timeout: Duration,
    sandboxes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
    events: broadcast::Sender<LifecycleEvent>,
}

#[derive(Debug, Default)]
struct Slot {
    running: Option<SandboxInfo>,
    started_before: bool,
    busy: usize,
    /// Bumped on every use, so an idle timer armed before a use does nothing.
    generation: u64,
}

impl SandboxManager {
    pub fn new(provider: Arc<dyn SandboxProvider>, idle_timeout: Duration) -> Arc<Self> {
        let (events, _) = broadcast::channel(256);
        Arc::new(Self {
            provider,
            idle_timeout,
            sandboxes: Mutex::new(HashMap::new()),
            events,
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LifecycleEvent> {
        self.events.subscribe()
    }

    pub fn provider(&self) -> &Arc<dyn SandboxProvider> {
        &self.provider
    }

    /// The sandbox of `spec.id`, started or resumed if needed, marked busy until the returned
    /// guard is dropped (call it for the length of one prompt).
    pub async fn acquire(self: &Arc<Self>, spec: SandboxSpec) -> Result<ActiveSandbox, Error> {
        let slot = self.slot(&spec.id);
        let mut guard = slot.lock().await;
        guard.generation += 1;
        // A sandbox that died on its own (wall-time cap, disk quota, crash) is started again;
        // its end is announced first.
        if guard.running.is_some() {
            let reason = match self.provider.status(&spec.id).await? {
                SandboxStatus::Running { .. } => None,
                SandboxStatus::Exited { status } if status.contains(DISK_QUOTA_EXIT) => {
                    Some(StopReason::DiskQuota)
                }
                _ => Some(StopReason::Exited),
            };
            if let Some(reason) = reason {
                guard.running = None;
                let _ = self.events.send(LifecycleEvent::Stopped {
                    id: spec.id.clone(),
                    reason,
                });
            }
        }
        let info = match &guard.running {
            Some(info) => info.clone(),
            None => {
                let info = self.provider.start(spec.clone()).await?;
                let resumed = guard.started_before;
                guard.started_before = true;
                guard.running = Some(info.clone());
                let _ = self.events.send(LifecycleEvent::Started {
                    info: info.clone(),
                    resumed,
                });
                info
            }
        };
        guard.busy += 1;
        Ok(ActiveSandbox {
            info,
            manager: self.clone(),
        })
    }

    /// Stops and deletes the sandbox of an archived session.
    pub async fn archive(&self, id: &str) -> Result<(), Error> {
        let slot = self.slot(id);
        let mut guard = slot.lock().await;
        guard.generation += 1;
        self.provider.remove(id).await?;
        let was_running = guard.running.take().is_some();
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if was_running {
            let _ = self.events.send(LifecycleEvent::Stopped {
                id: id.to_owned(),
                reason: StopReason::Archived,
            });
        }
        Ok(())
    }

    fn slot(&self, id: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    fn release(self: &Arc<Self>, id: String) {
        let manager = self.clone();
        tokio::spawn(async move {
            let slot = manager.slot(&id);
            let generation = {
                let mut guard = slot.lock().await;
                guard.busy = guard.busy.saturating_sub(1);
                if guard.busy > 0 {
                    return;
                }
                guard.generation += 1;
                guard.generation
            };
            tokio::time::sleep_until(Instant::now() + manager.idle_timeout).await;
            let mut guard = slot.lock().await;
            if guard.busy > 0 || guard.generation != generation || guard.running.is_none() {
                return;
            }
            match manager.provider.stop(&id).await {
                Ok(()) => {
                    guard.running = None;
                    let _ = manager.events.send(LifecycleEvent::Stopped {
                        id: id.clone(),
                        reason: StopReason::Idle,
                    });
                }
                Err(error) => tracing::warn!(%error, id, "cannot stop an idle sandbox"),
            }
        });
    }
}

/// A sandbox in use. Dropping it starts the idle clock.
#[derive(Debug)]
pub struct ActiveSandbox {
    info: SandboxInfo,
    manager: Arc<SandboxManager>,
}

impl ActiveSandbox {
    pub fn info(&self) -> &SandboxInfo {
        &self.info
    }
}

impl Drop for ActiveSandbox {
    fn drop(&mut self) {
        self.manager.release(self.info.id.clone());
    }
}
