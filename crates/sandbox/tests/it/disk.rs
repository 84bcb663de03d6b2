//! The disk quota: as root an ext4 image per sandbox (bytes and inodes refused with `ENOSPC`,
//! kept across a stop, gone with the sandbox, a crashed run's mount cleaned at the next start);
//! rootless a periodic check that stops a sandbox over its quota.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use canopy_sandbox::{
    BubblewrapProvider, DISK_QUOTA_EXIT, DiskQuota, ExecRequest, LifecycleEvent, Limits,
    SandboxManager, SandboxMode, SandboxProvider, SandboxStatus, StopReason,
};
use canopy_testkit::Script;

use crate::support::{Harness, loops_backed_by, mounts_under};

const QUOTA_BYTES: u64 = 64 << 20;

fn small_disk(inodes: u64) -> Limits {
    Limits {
        disk: DiskQuota {
            bytes: QUOTA_BYTES,
            inodes,
            check_interval: Duration::from_millis(200),
        },
        ..Limits::default()
    }
}

async fn harness(limits: Limits) -> Harness {
    let h = Harness::start_with(Script::new(), limits).await.unwrap();
    // Hard as root wherever loop devices exist (this host, CI); never rootless.
    let loops = std::path::Path::new("/dev/loop-control").exists();
    assert_eq!(
        h.provider.disk_quota_hard(),
        h.mode() == SandboxMode::Root && loops,
        "hard exactly as root with loop devices"
    );
    h
}

async fn exec(h: &Harness, id: &str, script: &str) -> canopy_sandbox::ExecOutput {
    h.provider.exec(id, ExecRequest::new(script)).await.unwrap()
}

#[tokio::test]
async fn writing_past_the_quota_with_dd_fails_with_enospc_and_the_image_stays_within_it() {
    let h = harness(small_disk(4096)).await;
    if !h.provider.disk_quota_hard() {
        // Rootless the quota is a check: `rootless_a_sandbox_over_its_quota_is_stopped`.
        return;
    }
    h.provider.prepare(&h.spec("fill")).await.unwrap();
    let image = h.root.join("fill").join("disk.img");

    let out = exec(
        &h,
        "fill",
        "dd if=/dev/zero of=/workspace/big bs=1M count=200 2>&1; echo rc=$?; \
         dd if=/dev/zero of=$HOME/more bs=1M count=10 2>&1; echo home=$?",
    )
    .await;

    assert!(
        out.stdout.contains("No space left on device"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("rc=1"), "{}", out.stdout);
    assert!(
        out.stdout.contains("home=1"),
        "home shares the quota: {}",
        out.stdout
    );
    let big = std::fs::symlink_metadata(h.workspace("fill").join("big")).unwrap();
    assert!(big.len() < QUOTA_BYTES, "{}", big.len());
    // What the host gave the sandbox: the image's allocated blocks, never more than its size.
    let allocated = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(allocated <= QUOTA_BYTES, "image allocates {allocated}");
    assert!(
        allocated > 32 << 20,
        "the fill landed in the image: {allocated}"
    );

    // Full is not stuck: freeing space lets the sandbox write again.
    let out = exec(
        &h,
        "fill",
        "rm /workspace/big && echo ok > /workspace/small && cat small",
    )
    .await;
    assert_eq!(out.stdout.trim(), "ok", "{}", out.stderr);
    h.provider.remove("fill").await.unwrap();
}

#[tokio::test]
async fn creating_more_files_than_the_inode_quota_is_refused() {
    let h = harness(small_disk(512)).await;
    if !h.provider.disk_quota_hard() {
        return;
    }
    h.provider.prepare(&h.spec("inodes")).await.unwrap();

    let out = exec(
        &h,
        "inodes",
        "mkdir -p /workspace/many && cd /workspace/many && \
         for i in $(seq 1 2000); do : > f$i 2>/dev/null || { echo refused at $i; : > g 2>&1; break; }; done",
    )
    .await;

    let refused_at: u64 = out
        .stdout
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no refusal: {} {}", out.stdout, out.stderr));
    assert!(refused_at <= 512, "refused at {refused_at}");
    assert!(
        refused_at > 100,
        "the clone left room: refused at {refused_at}"
    );
    assert!(
        out.stderr.contains("No space left on device"),
        "{}",
        out.stderr
    );
    h.provider.remove("inodes").await.unwrap();
}

#[tokio::test]
async fn the_workspace_survives_a_stop_and_resume_and_removal_leaves_no_mount_image_or_loop() {
    let h = harness(small_disk(4096)).await;
    let spec = h.spec("keep");
    h.provider.start(spec.clone()).await.unwrap();
    let out = exec(&h, "keep", "echo kept > /workspace/kept.txt && echo ok").await;
    assert_eq!(out.stdout.trim(), "ok", "{}", out.stderr);
    let image = h.root.join("keep").join("disk.img");
    let root_mode = h.provider.disk_quota_hard();
    if root_mode {
        assert_eq!(mounts_under(&h.root).len(), 1, "one mount while running");
    }

    h.provider.stop("keep").await.unwrap();
    assert_eq!(
        h.provider.status("keep").await.unwrap(),
        SandboxStatus::Stopped
    );
    assert!(mounts_under(&h.root).is_empty(), "unmounted when stopped");
    assert_eq!(image.is_file(), root_mode, "the image is kept (root mode)");

    h.provider.start(spec).await.unwrap();
    let out = exec(&h, "keep", "cat /workspace/kept.txt").await;
    assert_eq!(out.stdout.trim(), "kept", "{}", out.stderr);

    h.provider.remove("keep").await.unwrap();
    assert_eq!(
        h.provider.status("keep").await.unwrap(),
        SandboxStatus::Absent
    );
    assert!(mounts_under(&h.root).is_empty());
    assert!(!image.exists());
    assert!(!h.root.join("keep").exists());
    assert!(
        loops_backed_by(&image).is_empty(),
        "{:?}",
        loops_backed_by(&image)
    );
}

#[tokio::test]
async fn a_mount_left_by_a_killed_runner_is_cleaned_at_the_next_start_and_the_workspace_kept() {
    let h = harness(small_disk(4096)).await;
    if !h.provider.disk_quota_hard() {
        return;
    }
    let config = h.provider.config().clone();
    let crashed = BubblewrapProvider::new(config.clone()).unwrap();
    crashed.prepare(&h.spec("crash")).await.unwrap();
    let out = crashed
        .exec(
            "crash",
            ExecRequest::new("echo before > /workspace/before.txt && echo ok"),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout.trim(), "ok", "{}", out.stderr);
    let data = h.root.join("crash").join("data");
    assert_eq!(mounts_under(&h.root), [data.display().to_string()]);

    // A runner killed with SIGKILL: nothing unmounts; its uid leases end with it.
    drop(crashed);
    assert_eq!(mounts_under(&h.root).len(), 1, "the crash left the mount");

    let next = BubblewrapProvider::new(config).unwrap();
    assert!(
        mounts_under(&h.root).is_empty(),
        "the next start unmounted the stale disk"
    );
    next.prepare(&h.spec("crash")).await.unwrap();
    let out = next
        .exec("crash", ExecRequest::new("cat /workspace/before.txt"))
        .await
        .unwrap();
    assert_eq!(out.stdout.trim(), "before", "{}", out.stderr);
    assert_eq!(mounts_under(&h.root).len(), 1, "mounted once, not stacked");
    let image = h.root.join("crash").join("disk.img");
    next.remove("crash").await.unwrap();
    assert!(mounts_under(&h.root).is_empty());
    assert!(loops_backed_by(&image).is_empty());
}

#[tokio::test]
async fn rootless_a_sandbox_over_its_quota_is_stopped_with_the_reason() {
    let h = Harness::start_adjusted(Script::new(), |config| {
        config.force_rootless = true;
        config.limits = small_disk(4096);
    })
    .await
    .unwrap();
    assert!(!h.provider.disk_quota_hard());
    let manager = SandboxManager::new(h.provider.clone(), Duration::from_secs(600));
    let mut events = manager.subscribe();
    let active = manager.acquire(h.spec("over")).await.unwrap();

    // One file cannot pass the quota (RLIMIT_FSIZE); two together can, until the check.
    let out = exec(
        &h,
        "over",
        "dd if=/dev/zero of=/workspace/one bs=1M count=80 2>&1; echo rc=$?; \
         dd if=/dev/zero of=/workspace/two bs=1M count=40 2>&1",
    )
    .await;
    assert!(
        out.stdout.contains("rc=153"),
        "SIGXFSZ at the quota: {}",
        out.stdout
    );
    let one = std::fs::metadata(h.workspace("over").join("one"))
        .unwrap()
        .len();
    assert_eq!(one, QUOTA_BYTES);

    let status = tokio::time::timeout(Duration::from_secs(30), h.provider.wait_exited("over"))
        .await
        .expect("stopped within 30s")
        .unwrap();
    match status {
        SandboxStatus::Exited { status } => {
            assert!(status.contains(DISK_QUOTA_EXIT), "{status}")
        }
        other => panic!("expected an exit, got {other:?}"),
    }
    let used = h.provider.disk_usage("over").await.unwrap();
    assert!(used.bytes > QUOTA_BYTES, "{used:?}");

    // The next use announces why it stopped and is refused until the files go.
    drop(active);
    let refused = manager.acquire(h.spec("over")).await.unwrap_err();
    assert!(
        matches!(refused, canopy_sandbox::Error::DiskQuotaExceeded { .. }),
        "{refused}"
    );
    let stopped = loop {
        match events.try_recv() {
            Ok(LifecycleEvent::Stopped { reason, .. }) => break reason,
            Ok(_) => continue,
            Err(error) => panic!("no stop announced: {error:?}"),
        }
    };
    assert_eq!(stopped, StopReason::DiskQuota);
    let out = exec(&h, "over", "rm /workspace/one /workspace/two && echo freed").await;
    assert_eq!(out.stdout.trim(), "freed", "{}", out.stderr);
    let again = manager.acquire(h.spec("over")).await.unwrap();
    drop(again);
    manager.archive("over").await.unwrap();
}

#[tokio::test]
async fn every_writable_disk_backed_mount_in_the_sandbox_is_its_image() {
    let h = harness(small_disk(4096)).await;
    if !h.provider.disk_quota_hard() {
        return;
    }
    h.provider.prepare(&h.spec("view")).await.unwrap();

    let out = exec(&h, "view", "cat /proc/self/mountinfo").await;

    // (mount point, per-mount options, fs type, source) of every mount the sandbox sees.
    let mounts: Vec<(String, String, String, String)> = out
        .stdout
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let before: Vec<&str> = before.split(' ').collect();
            let after: Vec<&str> = after.split(' ').collect();
            Some((
                before.get(4)?.to_string(),
                before.get(5)?.to_string(),
                after.first()?.to_string(),
                after.get(1)?.to_string(),
            ))
        })
        .collect();
    let image_of = |point: &str| {
        mounts
            .iter()
            .find(|(p, ..)| p == point)
            .map(|(_, _, fs, source)| (fs.clone(), source.clone()))
            .unwrap_or_else(|| panic!("no {point} in {mounts:?}"))
    };
    let (fs, image) = image_of("/workspace");
    assert_eq!(fs, "ext4");
    assert!(image.starts_with("/dev/loop"), "{image}");
    // Memory-backed or not storage at all: capped by /tmp's size and the memory cgroup.
    let not_disk = ["tmpfs", "devtmpfs", "proc", "devpts", "mqueue", "sysfs"];
    for (point, options, fs, source) in &mounts {
        let writable = options.split(',').any(|option| option == "rw");
        if writable && !not_disk.contains(&fs.as_str()) {
            assert_eq!(
                source, &image,
                "{point} ({fs}) is writable and not in the image"
            );
        }
    }
    for point in ["/home/sandbox", "/run/canopy"] {
        assert_eq!(image_of(point).1, image, "{point}");
    }
    assert_eq!(image_of("/tmp").0, "tmpfs");
    h.provider.remove("view").await.unwrap();
}
