//! Faults as an operator meets them, with no operator step afterwards: the real `canopy` (and
//! the services as their own processes) killed with SIGKILL under a steady load of commands,
//! nats-server stopped and started, PostgreSQL restarted. After each, every accepted command's
//! events are in the store, the stream holds each event once, nothing is parked, and every read
//! model equals `canopy rebuild all --check`, within a stated time after the last restart.
//!
//! PostgreSQL and nats-server are this test's own (started from the installed binaries in a
//! temp dir), so that they can be stopped and started; the load is 16 clients over 32
//! sessions, each command with an idempotency key that a client retries until it is answered.

use std::time::{Duration, Instant};

use crate::canopy;
use crate::stack::{
    Load, Servers, Service, assert_healed, canopy_up, report, wait_for_answers, wait_healthy,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn canopy_up_killed_with_sigkill_under_load_heals_without_an_operator() {
    let servers = Servers::start();
    let free = || canopy_local_servers::free_port().unwrap();
    let (command_port, query_port) = (free(), free());
    let command_api = format!("http://127.0.0.1:{command_port}");
    let mut up = canopy_up(&servers.wiring(), command_port, query_port).await;
    let load = Load::start(&command_api).await;
    let mut restarted = Instant::now();
    // three kills at different moments of the load
    for (round, after) in [150u64, 400, 250].into_iter().enumerate() {
        let so_far = load.answered();
        wait_for_answers(&load, so_far + after).await;
        assert!(up.is_running(), "canopy up ended by itself (round {round})");
        up.kill().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        up = canopy_up(&servers.wiring(), command_port, query_port).await;
        restarted = Instant::now();
    }
    let so_far = load.answered();
    wait_for_answers(&load, so_far + 100).await;
    let accepted = load.finish().await;
    let healed = assert_healed(&servers.wiring(), &accepted, restarted).await;
    report("canopy up, SIGKILL ×3", &healed, accepted.len());
    up.stop().await;
}

/// The services as their own processes (scaling out): command-api, the relay and the
/// projectors; the relay and the projectors are killed with SIGKILL, in turn, under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_and_projectors_as_their_own_processes_killed_under_load_heal() {
    let servers = Servers::start();
    let command_port = canopy_local_servers::free_port().unwrap();
    let command_api = format!("http://127.0.0.1:{command_port}");
    let bin = canopy().parent().unwrap().to_owned();
    let api = Service::start(
        "command-api",
        bin.join("canopy-command-api"),
        &[],
        &servers.wiring(),
        &[(
            "CANOPY_COMMAND_API_ADDR",
            format!("127.0.0.1:{command_port}"),
        )],
        None,
    )
    .await;
    wait_healthy(&command_api).await;
    let wiring = servers.wiring();
    let relay = || Service::start("relay", canopy(), &["relay"], &wiring, &[], None);
    let projectors = || {
        Service::start(
            "projectors",
            bin.join("canopy-projectors"),
            &[],
            &wiring,
            &[],
            None,
        )
    };
    let mut running_relay = relay().await;
    let mut running_projectors = projectors().await;
    let load = Load::start(&command_api).await;
    let mut restarted = Instant::now();
    for round in 0..4 {
        let so_far = load.answered();
        wait_for_answers(&load, so_far + 150).await;
        if round % 2 == 0 {
            assert!(running_relay.is_running(), "the relay ended by itself");
            running_relay.kill().await;
            running_relay = relay().await;
        } else {
            assert!(
                running_projectors.is_running(),
                "the projectors ended by themselves"
            );
            running_projectors.kill().await;
            running_projectors = projectors().await;
        }
        restarted = Instant::now();
    }
    let so_far = load.answered();
    wait_for_answers(&load, so_far + 100).await;
    let accepted = load.finish().await;
    let healed = assert_healed(&servers.wiring(), &accepted, restarted).await;
    report(
        "relay and projectors, SIGKILL ×2 each",
        &healed,
        accepted.len(),
    );
    running_projectors.stop().await;
    running_relay.stop().await;
    api.stop().await;
}

/// nats-server killed under load and started again a few seconds later on the same store:
/// nothing is lost, nothing doubled, and canopy up never stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_stopped_and_started_under_load_heals() {
    let mut servers = Servers::start();
    let free = || canopy_local_servers::free_port().unwrap();
    let (command_port, query_port) = (free(), free());
    let command_api = format!("http://127.0.0.1:{command_port}");
    let mut up = canopy_up(&servers.wiring(), command_port, query_port).await;
    let load = Load::start(&command_api).await;
    let so_far = load.answered();
    wait_for_answers(&load, so_far + 200).await;
    servers.stop_nats().await;
    // commands are still accepted: the store is the truth, the stream catches up later
    let so_far = load.answered();
    wait_for_answers(&load, so_far + 100).await;
    servers.start_nats();
    let restarted = Instant::now();
    let so_far = load.answered();
    wait_for_answers(&load, so_far + 200).await;
    let accepted = load.finish().await;
    assert!(up.is_running(), "canopy up stopped when NATS did");
    let healed = assert_healed(&servers.wiring(), &accepted, restarted).await;
    report("nats-server stopped and started", &healed, accepted.len());
    up.stop().await;
}

/// PostgreSQL restarted under load (a fast shutdown): commands fail meanwhile and are retried
/// with their keys; canopy up rides it out and every part recovers on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_under_load_heals() {
    let mut servers = Servers::start();
    let free = || canopy_local_servers::free_port().unwrap();
    let (command_port, query_port) = (free(), free());
    let command_api = format!("http://127.0.0.1:{command_port}");
    let mut up = canopy_up(&servers.wiring(), command_port, query_port).await;
    let load = Load::start(&command_api).await;
    let so_far = load.answered();
    wait_for_answers(&load, so_far + 200).await;
    servers.restart_postgres().await;
    let restarted = Instant::now();
    let so_far = load.answered();
    wait_for_answers(&load, so_far + 200).await;
    let accepted = load.finish().await;
    assert!(
        up.is_running(),
        "canopy up stopped when PostgreSQL restarted"
    );
    let healed = assert_healed(&servers.wiring(), &accepted, restarted).await;
    report("PostgreSQL restarted", &healed, accepted.len());
    up.stop().await;
}
