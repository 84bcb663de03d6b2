//! What every Canopy process that supervises children or retries shares, written once:
//!
//! - [`spawn_tied`] starts a child from one long-lived thread, so a parent-death signal
//!   (`setpriv --pdeathsig`, `bwrap --die-with-parent`) fires when this *process* dies, not when
//!   the short-lived thread that happened to fork it ends; [`death_signal`] builds the
//!   `setpriv --pdeathsig` prefix; [`signal_group`] signals a child's whole process group.
//! - [`read_line_capped`] reads a child's output a line at a time with a bound on each line, so
//!   a child (a sandbox above all) cannot make the host buffer without limit.
//! - [`Backoff`]: exponential backoff with jitter, for every retry loop.
//! - [`shutdown_signal`]: SIGTERM or Ctrl+C, what every binary stops on.

mod backoff;
mod output;
mod spawn;

pub use backoff::Backoff;
pub use output::read_line_capped;
pub use spawn::{death_signal, signal_group, spawn_tied};

/// Resolves on SIGTERM or Ctrl+C (SIGINT), whichever comes first.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(term) => {
                term.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
