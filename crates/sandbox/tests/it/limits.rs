//! Runaway commands: memory and processes (the sandbox's cgroup), CPU time, file size and
//! processes per uid (rlimits), and the sandbox's wall-time cap.

use std::time::{Duration, Instant};

use canopy_opencode::TurnEnd;
use canopy_sandbox::{
    CgroupSupport, ExecRequest, Limits, SandboxMode, SandboxProvider, SandboxStatus,
};
use canopy_testkit::{Script, Step};
use serde_json::json;

use crate::support::{
    Harness, client, sandbox_processes, titled_session, tool_outputs, turn, wait_no_processes_of,
};

fn bash(command: &str) -> Step {
    Step::tool(
        "bash",
        json!({ "command": command, "description": "runaway", "timeout": 90000 }),
    )
}

/// Whether this provider has a memory cgroup per sandbox; when it has none, it says why. As root
/// this host has one (v1); rootless it has none (no delegated cgroup v2 subtree).
fn has_memory_cgroup(h: &Harness) -> bool {
    match (h.mode(), h.provider.cgroups()) {
        (SandboxMode::Root, support) => {
            assert!(
                support.is_available(),
                "this host lets root create cgroups: {support:?}"
            );
            true
        }
        (SandboxMode::Rootless, CgroupSupport::Unavailable { reason }) => {
            assert!(reason.contains("cgroup v2"), "{reason}");
            false
        }
        (SandboxMode::Rootless, _) => true,
    }
}

#[tokio::test]
async fn runaway_memory_cpu_and_file_size_are_stopped_and_opencode_survives() {
    runaway(false).await;
}

#[tokio::test]
async fn rootless_runaway_memory_cpu_and_file_size_are_stopped_and_opencode_survives() {
    runaway(true).await;
}

async fn runaway(force_rootless: bool) {
    let limits = Limits {
        memory_bytes: 2 << 30,
        // Only without a memory cgroup: each tool command's address space.
        command_address_space_bytes: 2 << 30,
        command_cpu_seconds: 5,
        file_size_bytes: 10 << 20,
        ..Limits::default()
    };
    let h = Harness::start_adjusted(Script::new(), |config| {
        config.limits = limits;
        config.force_rootless |= force_rootless;
    })
    .await
    .unwrap();
    if force_rootless {
        assert_eq!(h.mode(), SandboxMode::Rootless);
    }
    let cgroup = has_memory_cgroup(&h);
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
    if cgroup {
        // 137: SIGKILL from the OOM killer.
        assert!(outputs[0].contains("memory exit: 137"), "{}", outputs[0]);
        assert!(h.provider.oom_kills("runaway").await >= 1);
    } else {
        // No cgroup: the tool command's RLIMIT_AS refuses the buffer (dd exits 1).
        assert!(outputs[0].contains("memory exhausted"), "{}", outputs[0]);
        assert!(outputs[0].contains("memory exit: 1"), "{}", outputs[0]);
        assert_eq!(h.provider.oom_kills("runaway").await, 0);
    }
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

/// Runs [`FORK_UNTIL_FAILURE`] in the sandbox `id`: how many forks succeeded (300 when none
/// failed), the sandbox's host uid, and whether it had a pids cgroup.
async fn fork_until_failure(limits: Limits, id: &str, force_rootless: bool) -> (usize, u32, bool) {
    let h = Harness::start_adjusted(Script::new(), |config| {
        config.limits = limits;
        config.force_rootless |= force_rootless;
    })
    .await
    .unwrap();
    let cgroup = has_memory_cgroup(&h);
    let uid = h.provider.prepare(&h.spec(id)).await.unwrap();

    let out = h
        .provider
        .exec(id, ExecRequest::new(FORK_UNTIL_FAILURE))
        .await
        .unwrap();

    assert_eq!(out.code, Some(0), "{out:?}");
    let forks = if out.stdout.contains("fork failed") {
        forks_before_failure(&out.stdout)
    } else {
        300
    };
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
    let left = wait_no_processes_of(&h, id, uid, Duration::from_secs(10)).await;
    assert!(left.is_empty(), "sandbox processes left: {left:?}");
    h.provider.remove(id).await.unwrap();
    (forks, uid, cgroup)
}

#[tokio::test]
async fn the_pids_cgroup_stops_a_fork_loop() {
    let limits = Limits {
        pids: 24,
        ..Limits::default()
    };
    let (forks, _, cgroup) = fork_until_failure(limits, "fork-pids", false).await;
    if cgroup {
        // bwrap (twice), bash and perl hold 4 of the 24.
        assert!((10..24).contains(&forks), "{forks} forks under pids.max 24");
    } else {
        // Rootless without a delegated cgroup: pids.max is not enforced (the start-up warning
        // and docs/security.md say so); RLIMIT_NPROC (1024 here) is the bound.
        assert_eq!(forks, 300, "nothing but RLIMIT_NPROC limits processes");
    }
}

#[tokio::test]
async fn rlimit_nproc_stops_a_fork_loop_where_the_cgroup_would_not() {
    nproc_stops_a_fork_loop(false).await;
}

/// Rootless, `RLIMIT_NPROC` is set inside the sandbox's user namespace: it counts the
/// sandbox's processes, not every process of the invoking user.
#[tokio::test]
async fn rootless_rlimit_nproc_stops_a_fork_loop_of_the_sandbox_alone() {
    nproc_stops_a_fork_loop(true).await;
}

async fn nproc_stops_a_fork_loop(force_rootless: bool) {
    let limits = Limits {
        nproc: 24,
        pids: 512,
        ..Limits::default()
    };
    let (forks, uid, _) = fork_until_failure(limits, "fork-nproc", force_rootless).await;
    if uid == 0 {
        // Forced rootless as root: the sandbox's processes are host root's, which the kernel
        // exempts from RLIMIT_NPROC (docs/security.md: forced rootless is for tests).
        assert_eq!(forks, 300, "RLIMIT_NPROC does not bind host root");
    } else {
        assert!(
            (10..24).contains(&forks),
            "{forks} forks under RLIMIT_NPROC 24"
        );
    }
}

#[tokio::test]
async fn the_wall_time_cap_kills_a_running_sandbox() {
    // Well above OpenCode's start-up on two loaded cores (seen at 12 s), which the cap counts.
    let cap = Duration::from_secs(25);
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
    let running = sandbox_processes(&h, "wall-time", info.uid);
    assert!(
        running.len() >= 2,
        "the sandbox's processes (bwrap, OpenCode, the bridges) are found: {running:?}"
    );

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
    let left = wait_no_processes_of(&h, "wall-time", info.uid, Duration::from_secs(10)).await;
    assert!(left.is_empty(), "sandbox processes left: {left:?}");

    h.provider.remove("wall-time").await.unwrap();
}

#[tokio::test]
async fn exec_output_past_the_host_limit_stops_the_command_with_a_clear_error() {
    let h = Harness::start(Script::new()).await.unwrap();
    let uid = h.provider.prepare(&h.spec("chatty")).await.unwrap();

    // 40 MiB on stdout: more than the host keeps of an exec's output (16 MiB a stream).
    let began = Instant::now();
    let result = h
        .provider
        .exec(
            "chatty",
            ExecRequest::new("head -c 40m /dev/zero; sleep 30; echo done"),
        )
        .await;

    let error = match result {
        Ok(out) => panic!(
            "the host read {} bytes of output: {:?}",
            out.stdout.len(),
            out.code
        ),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("more than 16777216 bytes"), "{error}");
    assert!(error.contains("stdout"), "{error}");
    // Stopped at the limit, not at the end of the script.
    assert!(
        began.elapsed() < Duration::from_secs(25),
        "{:?}",
        began.elapsed()
    );
    let left = wait_no_processes_of(&h, "chatty", uid, Duration::from_secs(10)).await;
    assert!(left.is_empty(), "sandbox processes left: {left:?}");
    // Within the limit, output comes back whole.
    let out = h
        .provider
        .exec(
            "chatty",
            ExecRequest::new("head -c 1m /dev/zero | tr '\\0' x"),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), 1 << 20);

    h.provider.remove("chatty").await.unwrap();
}
