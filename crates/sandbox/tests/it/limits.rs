//! Runaway commands: memory (the sandbox's cgroup), CPU time and file size (rlimits).

use canopy_opencode::TurnEnd;
use canopy_sandbox::{Limits, SandboxProvider};
use canopy_testkit::{Script, Step};
use serde_json::json;

use crate::support::{Harness, client, titled_session, tool_outputs, turn};

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
