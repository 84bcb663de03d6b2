//! Starts the test servers once for a whole test run (so each test process need not start its
//! own), writes `DATABASE_URL=` and `NATS_URL=` lines to the file named by its argument, and
//! keeps them up until it is terminated or its parent exits. Used by `scripts/test.sh`.

use std::time::Duration;

use anyhow::{Context, Result};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let out = std::env::args()
        .nth(1)
        .context("usage: canopy-test-services <env-file>")?;
    let pg = canopy_testkit::pg_server().await?;
    let nats = canopy_testkit::nats_server().await?;
    let tmp = format!("{out}.tmp");
    std::fs::write(
        &tmp,
        format!("DATABASE_URL={}\nNATS_URL={}\n", pg.url, nats.url),
    )?;
    std::fs::rename(&tmp, &out)?;

    let parent = std::os::unix::process::parent_id();
    let shutdown = canopy_process::shutdown_signal();
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            // a parent killed without cleaning up: do not outlive it
            _ = tick.tick() => if std::os::unix::process::parent_id() != parent { break },
        }
    }
    // Returning ends the process; the servers get their parent-death signal.
    Ok(())
}
