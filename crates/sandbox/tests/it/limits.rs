//! Runaway commands: memory and processes (the sandbox's cgroup), CPU time, file size and
//! processes per uid (rlimits), and the sandbox's wall-time cap.

use std::time::{Duration, Instant};

use canopy_opencode::TurnEnd;
use canopy_sandbox::{ExecRequest, Limits, SandboxProvider, SandboxStatus};
use canopy_testkit::{Script, Step};
use serde_json::json;

use crate::support::{Harness, client, titled_session, tool_outputs, turn, wait_no_processes_of};

fn bash(command: &str) -> Step {
    Step::tool(
        "bash",
        json!({ "command": command, "description": "runaway", "timeout": 90000 }),
    )
}

#[tokio::test]
async fn runaway_memory_cpu_and_file_size_are_stopped_and_opencode_survives() {
    let limits = Limits {
        memory_bytes: 2 << 30,
        command_cpu_seconds: 5,
        file_size_bytes: 10 << 20,
        ..Limits::default()
    };
    let h = Harness::start_with(Script::new(), limits).await.unwrap();
    assert!(
        h.provider.cgroups().is_available(),
        "this host lets root create cgroups: {:?}",
        h.provider.cgroups()
    );
    h.model.push([
        // dd fills a 3 GB buffer: over the sandbox's 2 GiB before it used its CPU budget.
        bash("dd if=/dev/zero of=/dev/null bs=3000M count=1; echo \"memory exit: $?\""),
        bash("bash -c 'while :; do :; done'; echo \"cpu exit: $?\""),
        bash("head -c 20m /dev/zero > big; echo \"fsize exit: $?\"; stat -c 'size %s' big"),
        Step::text("Survived."),
    ]);
    let info = h.provider.start(h.spec("runaway")).await.unwrap();
    let client = client(&info).unwrap();
    let session = titled_session(&client).await.unwrap();

    let outcome = turn(&client, &session, "Use everything.").await.unwrap();

    assert_eq!(
        outcome.end,
        TurnEnd::Completed,
        "OpenCode outlived its commands"
    );
    let outputs = tool_outputs(&outcome);
    assert_eq!(outputs.len(), 3, "{outputs:#?}");
    // 137: SIGKILL from the OOM killer.
    assert!(outputs[0].contains("memory exit: 137"), "{}", outputs[0]);
    assert!(h.provider.oom_kills("runaway").await >= 1);
    // 152: SIGXCPU once the command used its CPU seconds.
    assert!(outputs[1].contains("cpu exit: 152"), "{}", outputs[1]);
    // 153: SIGXFSZ; the file stops at the limit.
    assert!(outputs[2].contains("fsize exit: 153"), "{}", outputs[2]);
    assert!(
        outputs[2].contains(&format!("size {}", 10 << 20)),
        "{}",
        outputs[2]
    );
    assert!(client.health().await.unwrap().healthy);

    h.provider.remove("runaway").await.unwrap();
}

/// Forks children that sleep until one fork fails, then kills and reaps them all: bounded
/// whatever the limit, and it says how far it got and why it stopped.
const FORK_UNTIL_FAILURE: &str = r#"perl -e '
my @kids;
for (1..300) {
    my $pid = fork;
    if (!defined $pid) { print "fork failed after ", scalar(@kids), ": $!\n"; last }
    if ($pid == 0) { sleep 120; exit 0 }
    push @kids, $pid;
}
kill "KILL", @kids;
waitpid($_, 0) for @kids;
print "reaped ", scalar(@kids), "\n";
'"#;

/// How many forks succeeded before the first failure, from [`FORK_UNTIL_FAILURE`]'s output.
fn forks_before_failure(stdout: &str) -> usize {
    let line = stdout
        .lines()
        .find(|line| line.starts_with("fork failed after "))
        .unwrap_or_else(|| panic!("no fork failed: {stdout}"));
    assert!(
        line.ends_with(": Resource temporarily unavailable"),
        "{line}"
    );
    line["fork failed after ".len()..]
        .split(':')
        .next()
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

async fn fork_until_failure(limits: Limits, id: &str) -> (usize, u32) {
    let h = Harness::start_with(Script::new(), limits).await.unwrap();
    let uid = h.provider.prepare(&h.spec(id)).await.unwrap();

    let out = h
        .provider
        .exec(id, ExecRequest::new(FORK_UNTIL_FAILURE))
        .await
        .unwrap();

    assert_eq!(out.code, Some(0), "{out:?}");
    let forks = forks_before_failure(&out.stdout);
    assert!(
        out.stdout.contains(&format!("reaped {forks}")),
        "{}",
        out.stdout
    );
    // The host is fine: it still forks, and nothing of the sandbox outlived it.
    assert!(
        std::process::Command::new("true")
            .status()
            .unwrap()
            .success()
    );
    let left = wait_no_processes_of(uid, Duration::from_secs(10)).await;
    assert!(left.is_empty(), "sandbox processes left: {left:?}");
    h.provider.remove(id).await.unwrap();
    (forks, uid)
}

#[tokio::test]
async fn the_pids_cgroup_stops_a_fork_loop() {
    let limits = Limits {
        pids: 24,
        ..Limits::default()
    };
    let (forks, _) = fork_until_failure(limits, "fork-pids").await;
    // bwrap (twice), bash and perl hold 4 of the 24.
    assert!((10..24).contains(&forks), "{forks} forks under pids.max 24");
}

#[tokio::test]
async fn rlimit_nproc_stops_a_fork_loop_where_the_cgroup_would_not() {
    let limits = Limits {
        nproc: 24,
        pids: 512,
        ..Limits::default()
    };
    let (forks, _) = fork_until_failure(limits, "fork-nproc").await;
    assert!(
        (10..24).contains(&forks),
        "{forks} forks under RLIMIT_NPROC 24"
    );
}

#[tokio::test]
async fn the_wall_time_cap_kills_a_running_sandbox() {
    let cap = Duration::from_secs(12);
    let limits = Limits {
        max_wall_time: cap,
        ..Limits::default()
    };
    let h = Harness::start_with(Script::new(), limits).await.unwrap();
    let began = Instant::now();
    let info = h.provider.start(h.spec("wall-time")).await.unwrap();
    assert!(
        info.startup < cap,
        "startup took {:?}, longer than the cap under test",
        info.startup
    );
    let client = client(&info).unwrap();
    assert!(client.health().await.unwrap().healthy);

    let status = tokio::time::timeout(
        cap + Duration::from_secs(30),
        h.provider.wait_exited("wall-time"),
    )
    .await
    .expect("the cap ended the sandbox")
    .unwrap();

    assert!(began.elapsed() >= cap, "{:?}", began.elapsed());
    match &status {
        SandboxStatus::Exited { status } => {
            assert!(status.contains("killed at the wall-time limit"), "{status}");
            assert!(status.contains("signal: 9"), "{status}");
        }
        other => panic!("expected an exit, got {other:?}"),
    }
    assert!(client.health_within(Duration::from_secs(2)).await.is_err());
    let left = wait_no_processes_of(info.uid, Duration::from_secs(10)).await;
    assert!(left.is_empty(), "sandbox processes left: {left:?}");

    h.provider.remove("wall-time").await.unwrap();
}
